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
  table = ["| result | value |", "|---|---|"]
  if summary:
    lines += ["", "## Pretraining (zero-shot)", ""]
    lines.append(f"{summary['steps']} steps in {summary.get('wall_time_s', 0) / 60:.1f} min.")
    lines += ["", "| split | top-1 | top-5 | classes | chance | x chance |", "|---|---:|---:|---:|---:|---:|"]
    for split, m in summary.get("zeroshot", {}).items():
      ci = m.get("top1_ci95")
      lines.append(f"| {split} | {_pct(m['top1'], ci)} | {_pct(m['top5'])} | {m['num_classes']} | "
                   f"{_pct(m['chance'])} | {m['top1'] / m['chance']:.1f} |")
      table.append(f"| zero-shot top-1, {split} ({m['num_classes']} classes) | "
                   f"{_pct(m['top1'], ci)} % (chance {_pct(m['chance'])} %) |")
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
    for m in ("zeroshot", "zs_head_adapt", "protonet", "conv4_maml", "pixels_protonet"):
      for split in ("test_classes", "test_scripts", "test_fonts"):
        for st in ("5way1shot", "5way5shot", "20way1shot"):
          r = merged["methods"].get(m, {}).get(split, {}).get(st)
          if r:
            table.append(f"| {m}, {split}, {st} | {_pct(r['mean'], r['ci95'])} % |")
  if adapt and "dg" in adapt:
    lines += ["", "## Domain generalisation on held-out fonts", "",
              "A linear adaptor on the image features, fine-tuned on the source fonts (plain "
              "fine-tuning = ERM) or with MLDG, and WiSE-FT interpolations of the ERM "
              "adaptor with the identity (= the pretrained model).", ""]
    lines.append(results_markdown({"dg": adapt["dg"]}))
    if plot_per_font(adapt["dg"], os.path.join(run, "accuracy_per_font.png")):
      lines += ["", "![zero-shot accuracy per held-out font](accuracy_per_font.png)"]
    for v, per in adapt["dg"]["zeroshot"].items():
      for sp, r in per.items():
        table.append(f"| DG {v}, zero-shot {sp} | {_pct(r['top1'])} % |")
  if conv4:
    mt = conv4.get("meta_training", {})
    lines += ["", f"Conv-4 {mt.get('algorithm', '')} was meta-trained from scratch for "
              f"{mt.get('steps')} steps on {mt.get('train_setting')} tasks."]
  with open(os.path.join(run, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(run, "results_table.md"), "w") as f:
    f.write("\n".join(table) + "\n")
  return os.path.join(run, "report.md")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--run", required=True)
  p.add_argument("--wall_time_s", type=float, default=None)
  args = p.parse_args(argv)
  print(build(args.run, args.wall_time_s))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
