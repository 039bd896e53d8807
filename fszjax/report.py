"""`python -m fszjax.report --run runs/glyphs`: the main job's report (markdown + PNG figures).

Reads what the stages wrote (pretrain/summary.json, metrics.jsonl, adapt/results.json,
maml_conv4/results.json) and writes ``report.md``, ``results_table.md`` and the figures
``learning_curves.png``, ``accuracy_vs_shots.png``, ``accuracy_per_font.png``. Every number
comes from those files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time


def _load(path):
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def _pct(x, ci=None):
  return f"{100 * x:.1f}" + (f" ± {100 * ci:.1f}" if ci is not None else "")


def _merge_methods(*results):
  out: dict = {}
  for r in results:
    if not r:
      continue
    for m, per in r.get("methods", {}).items():
      for split, settings in per.items():
        out.setdefault(m, {}).setdefault(split, {}).update(settings)
  return out


def plot_per_font(dg: dict, out_path: str) -> bool:
  per = (dg or {}).get("per_font", {}).get("test_fonts")
  if not per:
    return False
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  variants = [v for v in ("pretrained", "finetune", "mldg", "wise_ft_0.5") if v in per]
  fonts = sorted(next(iter(per.values())).keys())
  x = np.arange(len(fonts))
  w = 0.8 / max(len(variants), 1)
  fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(fonts)), 4))
  for i, v in enumerate(variants):
    ax.bar(x + i * w, [100 * per[v][f] for f in fonts], w, label=v)
  ax.set_xticks(x + 0.4 - w / 2)
  ax.set_xticklabels(fonts, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("zero-shot top-1 (%)")
  ax.set_title("test_fonts: zero-shot accuracy per held-out font")
  ax.legend(fontsize=8)
  ax.grid(alpha=.3, axis="y")
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)
  return True


def build(run: str, wall_time_s: float | None = None) -> str:
  from fszjax.fewshot.adapt import plot_shots, results_markdown

  summary = _load(os.path.join(run, "pretrain", "summary.json"))
  adapt = _load(os.path.join(run, "adapt", "results.json"))
  conv4 = _load(os.path.join(run, "maml_conv4", "results.json"))
  lines = [f"# fszjax main job report: {os.path.basename(os.path.abspath(run))}", ""]
  lines.append(f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
               f"{platform.machine()} with {os.cpu_count()} CPU cores"
               + (f"; whole job {wall_time_s / 60:.1f} min." if wall_time_s else "."))
  if summary:
    lines += ["", "## Pretraining (zero-shot)", ""]
    lines.append(f"{summary['steps']} steps in {summary.get('wall_time_s', 0) / 60:.1f} min.")
    lines += ["", "| split | top-1 | top-5 | classes | chance | x chance |", "|---|---:|---:|---:|---:|---:|"]
    for split, m in summary.get("zeroshot", {}).items():
      ci = m.get("top1_ci95")
      lines.append(f"| {split} | {_pct(m['top1'], ci)} | {_pct(m['top5'])} | {m['num_classes']} | "
                   f"{_pct(m['chance'])} | {m['top1'] / m['chance']:.1f} |")
    ret = summary.get("retrieval", {})
    if ret:
      lines += ["", "| split | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 |", "|---|---:|---:|---:|---:|"]
      for split, r in ret.items():
        lines.append(f"| {split} | {_pct(r['i2t_r1'])} | {_pct(r['i2t_r5'])} | {_pct(r['t2i_r1'])} | "
                     f"{_pct(r['t2i_r5'])} |")
    src = os.path.join(run, "pretrain", "report.png")
    if os.path.exists(src):
      shutil.copy(src, os.path.join(run, "learning_curves.png"))
      lines += ["", "![learning curves and zero-shot accuracy over training](learning_curves.png)"]
  merged = {"methods": _merge_methods(adapt, conv4)}
  if merged["methods"]:
    lines += ["", "## Few-shot accuracy (mean ± 95% CI over episodes)", ""]
    lines.append(results_markdown(merged))
    plot_shots(merged, os.path.join(run, "accuracy_vs_shots.png"))
    lines += ["", "![accuracy against shots per method](accuracy_vs_shots.png)"]
  if adapt and "dg" in adapt:
    lines += ["", "## Domain generalisation on held-out fonts", "",
              "A linear adaptor on the image features, fine-tuned on the source fonts (plain "
              "fine-tuning = ERM) or with MLDG, and WiSE-FT interpolations of the ERM "
              "adaptor with the identity (= the pretrained model).", ""]
    lines.append(results_markdown({"dg": adapt["dg"]}))
    if plot_per_font(adapt["dg"], os.path.join(run, "accuracy_per_font.png")):
      lines += ["", "![zero-shot accuracy per held-out font](accuracy_per_font.png)"]
  for name, r in (("towers", adapt), ("Conv-4", conv4)):
    mt = (r or {}).get("meta_training")
    if mt:
      lines += ["", f"Meta-training of the {name}: {mt.get('algorithm')}, {mt.get('steps')} steps "
                f"of {mt.get('meta_batch', '')} {mt.get('train_setting')} tasks."]
  table = results_table(summary, merged["methods"], adapt, conv4, wall_time_s)
  lines = lines[:3] + ["## Summary", "", table, ""] + lines[3:]
  with open(os.path.join(run, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(run, "results_table.md"), "w") as f:
    f.write(table + "\n")
  return os.path.join(run, "report.md")


def machine() -> str:
  """'<cpu model>, N cores' (or the platform when /proc/cpuinfo is unavailable)."""
  name = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          name = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{name}, {os.cpu_count()} cores"


# The rows of the summary table: (method key, label).
SUMMARY_METHODS = (
    ("zeroshot", "towers: zero-shot (class names)"),
    ("zs_head_adapt", "towers: zero-shot head + SGD on the support set"),
    ("anil", "towers: ANIL meta-trained, zero-shot head + SGD"),
    ("protonet", "towers: ProtoNets on frozen features"),
    ("linear_probe", "towers: linear probe"),
    ("conv4_maml", "Conv-4 MAML from scratch"),
    ("pixels_protonet", "raw pixels, nearest prototype (32 px)"),
    ("pixels_protonet_28px", "raw pixels, nearest prototype (28 px)"),
)
SUMMARY_SPLITS = ("test_classes", "test_scripts", "test_fonts", "test_both")
SUMMARY_SETTINGS = ("5way1shot", "5way5shot", "20way1shot")


def results_table(summary, methods, adapt, conv4, wall_time_s=None) -> str:
  """The compact results of a run (markdown): zero-shot, few-shot per split, DG."""
  out = [f"Measured by `launch/local.sh` on {time.strftime('%Y-%m-%d', time.gmtime())}, "
         f"{machine()}, no accelerator" + (f"; whole job {wall_time_s / 60:.1f} min" if wall_time_s
                                          else "") + ". Accuracy in %, mean ± 95% CI."]
  if summary:
    out += ["", "| zero-shot over all classes of the split | top-1 | chance |", "|---|---:|---:|"]
    for split, m in summary.get("zeroshot", {}).items():
      out.append(f"| {split} ({m['num_classes']} classes) | {_pct(m['top1'], m.get('top1_ci95'))} | "
                 f"{_pct(m['chance'])} |")
  for split in SUMMARY_SPLITS:
    rows = []
    for key, label in SUMMARY_METHODS:
      per = methods.get(key, {}).get(split)
      if per:
        cells = [(_pct(per[st]["mean"], per[st]["ci95"]) if st in per else "") for st in SUMMARY_SETTINGS]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    if rows:
      eps = max(r["episodes"] for m in methods.values() for r in m.get(split, {}).values())
      out += ["", f"| {split} ({eps} episodes) | 5-way 1-shot | 5-way 5-shot | 20-way 1-shot |",
              "|---|---:|---:|---:|"] + rows
  dg = (adapt or {}).get("dg")
  if dg:
    splits = sorted({sp for per in dg["zeroshot"].values() for sp in per})
    few = dg.get("fewshot", {})
    few_cols = [(sp, st) for sp in splits for st in SUMMARY_SETTINGS
                if any(st in v.get("zs_head_adapt", {}).get(sp, {}) for v in few.values())]
    out += ["", "| held-out fonts: feature adaptor | "
            + " | ".join([f"zero-shot {sp}" for sp in splits]
                         + [f"{sp} {st}, zero-shot head + SGD" for sp, st in few_cols]) + " |",
            "|---|" + "---:|" * (len(splits) + len(few_cols))]
    for v, per in dg["zeroshot"].items():
      cells = [_pct(per[sp]["top1"], per[sp].get("ci95")) if sp in per else "" for sp in splits]
      for sp, st in few_cols:
        r = few.get(v, {}).get("zs_head_adapt", {}).get(sp, {}).get(st)
        cells.append(_pct(r["mean"], r["ci95"]) if r else "")
      out.append(f"| {v} | " + " | ".join(cells) + " |")
  return "\n".join(out)


README_BEGIN = "<!-- results:begin (written by python -m fszjax.report --readme) -->"
README_END = "<!-- results:end -->"


def update_readme(readme: str, table: str) -> bool:
  """Replaces the text between the results markers of `readme` with `table`."""
  with open(readme) as f:
    text = f.read()
  if README_BEGIN not in text or README_END not in text:
    return False
  head, rest = text.split(README_BEGIN, 1)
  _, tail = rest.split(README_END, 1)
  with open(readme, "w") as f:
    f.write(head + README_BEGIN + "\n" + table.strip() + "\n" + README_END + tail)
  return True


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--run", required=True)
  p.add_argument("--wall_time_s", type=float, default=None)
  p.add_argument("--readme", default="", help="also write the results table into this "
                 "README between its results markers")
  args = p.parse_args(argv)
  print(build(args.run, args.wall_time_s))
  if args.readme:
    with open(os.path.join(args.run, "results_table.md")) as f:
      table = f.read()
    if not update_readme(args.readme, table):
      print(f"{args.readme} has no results markers; not updated")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
