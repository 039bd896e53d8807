"""`python -m fszjax.report --run runs/glyphs`: the main job's report (markdown + PNG figures).

Reads what the stages wrote (pretrain/summary.json, metrics.jsonl, adapt/results.json,
maml_conv4/results.json) and writes ``report.md``, ``results_table.md`` and the figures
``learning_curves.png`` (with zero-shot accuracy ± 95% CI over training),
``accuracy_vs_shots.png`` (per split and way, methods grouped by colour),
``accuracy_per_font.png`` (with each font's image count), ``meta_training.png`` and
``wise_ft.png``. The header names the machine, the package versions and the wall time of
each stage (``stage_times.tsv``, written by launch/local.sh). Every number comes from those
files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import time
from importlib import metadata

import numpy as np

from fszjax.fewshot.results import results_markdown
from fszjax.metrics import plot_report, read_jsonl


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


def build(run: str, wall_time_s: float | None = None) -> str:
  summary = _load(os.path.join(run, "pretrain", "summary.json"))
  adapt = _load(os.path.join(run, "adapt", "results.json"))
  conv4 = _load(os.path.join(run, "maml_conv4", "results.json"))
  lines = [f"# fszjax main job report: {os.path.basename(os.path.abspath(run))}", ""]
  stages = stage_times(run)
  for name, key in (("pretrain", "pretrain"), ("adapt", "adapt"), ("maml_conv4", "maml_conv4")):
    r = {"pretrain": summary, "adapt": adapt, "maml_conv4": conv4}[key]
    if name not in stages and r and r.get("wall_time_s"):
      stages[name] = float(r["wall_time_s"])
  stage_text = ", ".join(f"{k} {v / 60:.1f} min" for k, v in stages.items())
  lines.append(f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}"
               + (f"; whole job {wall_time_s / 60:.1f} min" if wall_time_s else "")
               + (f" (stages: {stage_text})" if stage_text else "") + ".  ")
  lines.append(f"Packages: {package_versions()}.")
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
    src = os.path.join(run, "pretrain", "metrics.jsonl")
    if os.path.exists(src):
      plot_report(src, os.path.join(run, "learning_curves.png"), title="pretraining")
      lines += ["", "![learning curves and zero-shot accuracy (± 95% CI) over training]"
                "(learning_curves.png)"]
  merged = {"methods": _merge_methods(adapt, conv4)}
  if merged["methods"]:
    lines += ["", "## Few-shot accuracy (mean ± 95% CI over episodes)", ""]
    lines.append(results_markdown(merged))
    if plot_accuracy_vs_shots(merged["methods"], os.path.join(run, "accuracy_vs_shots.png")):
      lines += ["", "![accuracy (mean ± 95% CI) against shots, per split and way]"
                "(accuracy_vs_shots.png)"]
  if adapt and "dg" in adapt:
    lines += ["", "## Domain generalisation on held-out fonts", "",
              "A linear adaptor on the image features, fine-tuned on the source fonts (plain "
              "fine-tuning = ERM) or with MLDG, and WiSE-FT interpolations of the ERM "
              "adaptor with the identity (= the pretrained model).", ""]
    lines.append(results_markdown({"dg": adapt["dg"]}))
    if plot_wise_ft(adapt["dg"], os.path.join(run, "wise_ft.png")):
      lines += ["", "![WiSE-FT: zero-shot accuracy against alpha](wise_ft.png)"]
    if plot_per_font(adapt["dg"], os.path.join(run, "accuracy_per_font.png")):
      lines += ["", "![zero-shot accuracy per held-out font](accuracy_per_font.png)"]
  for name, r in (("towers", adapt), ("Conv-4", conv4)):
    mt = (r or {}).get("meta_training")
    if mt:
      lines += ["", f"Meta-training of the {name}: {mt.get('algorithm')}, {mt.get('steps')} steps "
                f"of {mt.get('meta_batch', '')} {mt.get('train_setting')} tasks."]
  curves = {}
  for name, sub, r in (("towers", "adapt", adapt), ("Conv-4", "maml_conv4", conv4)):
    if (r or {}).get("meta_training"):
      curves[name] = read_jsonl(os.path.join(run, sub, "metrics.jsonl"))
  if plot_meta_training(curves, os.path.join(run, "meta_training.png")):
    lines += ["", "![meta-training curves](meta_training.png)"]
  table = results_table(summary, merged["methods"], adapt, conv4, wall_time_s)
  lines = lines[:4] + ["", "## Summary", "", table, ""] + lines[4:]
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
    ("protonet_meta", "towers: ProtoNets meta-trained (whole image tower, cross-font tasks)"),
    ("proto_zs_adapt_meta", "towers, ProtoNets meta-trained: zero-shot + prototype head (mix gated at 1 shot, by support leave-one-out at 5) + SGD"),
    ("tip_adapter_meta", "towers, ProtoNets meta-trained: Tip-Adapter + zero-shot (gated)"),
    ("linear_probe", "towers: linear probe"),
    ("proto_zs_adapt", "towers: zero-shot + prototype head (mix gated at 1 shot, by support leave-one-out at 5) + SGD"),
    ("tip_adapter", "towers: Tip-Adapter cache + zero-shot (gated)"),
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


# ----------------------------------------------------------------------------- figures

# Methods in groups, one colour family per group, the same colour in every figure.
METHOD_GROUPS = (
    ("towers, training-free", ("zeroshot", "protonet", "tip_adapter", "anil_zeroshot"),
     ("#08306b", "#2171b5", "#6baed6", "#9ecae1")),
    ("towers, adapted", ("zs_head_adapt", "linear_probe", "wise_ft", "anil", "lp_ft", "finetune",
                         "proto_zs_adapt", "protonet_meta", "proto_zs_adapt_meta",
                         "tip_adapter_meta"),
     ("#00441b", "#238b45", "#74c476", "#a1d99b", "#006d2c", "#41ab5d", "#c7e9c0", "#005a32",
      "#2ca25f", "#99d8c9")),
    ("from scratch / pixels", ("conv4_maml", "pixels_protonet", "pixels_protonet_28px"),
     ("#a50f15", "#737373", "#bdbdbd")),
)
_EXTRA_COLOURS = ("#6a51a3", "#9e9ac8", "#d94801", "#fd8d3c", "#8c6d31", "#e7ba52")


def method_colours(names) -> dict[str, str]:
  """A fixed colour per method (grouped families); unknown methods get the spare colours."""
  out = {}
  for _, members, colours in METHOD_GROUPS:
    out.update(dict(zip(members, colours)))
  spare = iter(_EXTRA_COLOURS * 4)
  for n in sorted(names):
    if n not in out:
      out[n] = next(spare)
  return out


def _ordered_methods(names) -> list[str]:
  order = [m for _, members, _ in METHOD_GROUPS for m in members]
  return [m for m in order if m in names] + sorted(n for n in names if n not in order)


def _plt():
  import matplotlib  # noqa: PLC0415  (heavy, optional: plots only)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415  (heavy, optional: plots only)

  plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 8})
  return plt


def _setting(st: str):
  m = re.fullmatch(r"(\d+)way(\d+)shot", st)
  return (int(m.group(1)), int(m.group(2))) if m else None


def plot_accuracy_vs_shots(methods: dict, out_path: str) -> bool:
  """One panel per (way, split): accuracy (mean ± 95% CI) against shots, a line per
  method joining only the settings of that same way and split."""
  ways = sorted({_setting(st)[0] for per in methods.values() for r in per.values() for st in r
                 if _setting(st)})
  splits = [s for s in SUMMARY_SPLITS if any(s in per for per in methods.values())]
  splits += sorted({s for per in methods.values() for s in per} - set(splits))
  if not ways or not splits:
    return False
  plt = _plt()
  colours = method_colours(methods)
  names = _ordered_methods(methods)
  fig, axes = plt.subplots(len(ways), len(splits), figsize=(3.4 * len(splits) + 2.6, 3.1 * len(ways)),
                           squeeze=False, sharey="row")
  drawn = {}
  for i, way in enumerate(ways):
    for j, split in enumerate(splits):
      ax = axes[i][j]
      shots_seen = set()
      for k, name in enumerate(names):
        res = methods[name].get(split, {})
        pts = sorted((_setting(st)[1], r) for st, r in res.items()
                     if _setting(st) and _setting(st)[0] == way)
        if not pts:
          continue
        shots_seen |= {p[0] for p in pts}
        off = (k - len(names) / 2) * 0.015  # a small dodge keeps the error bars apart
        xs = [p[0] * (1 + off) for p in pts]
        h = ax.errorbar(xs, [100 * p[1]["mean"] for p in pts], yerr=[100 * p[1]["ci95"] for p in pts],
                        marker="o", ms=4, capsize=2, lw=1.3, color=colours[name], label=name)
        drawn[name] = h
      ax.axhline(100 / way, color="k", ls=":", lw=0.8)
      ax.set_xscale("log")
      ticks = sorted(shots_seen) or [1]
      ax.set_xticks(ticks)
      ax.set_xticklabels([str(t) for t in ticks])
      ax.minorticks_off()
      ax.set_xlim(min(ticks) / 1.6, max(ticks) * 1.6)
      ax.set_title(f"{split}, {way}-way")
      ax.grid(alpha=.3)
      if i == len(ways) - 1:
        ax.set_xlabel("shots per class")
      if j == 0:
        ax.set_ylabel("accuracy (%)\n(dotted: chance)")
  handles = [drawn[n] for n in names if n in drawn]
  fig.legend(handles, [n for n in names if n in drawn], loc="center left", bbox_to_anchor=(0.995, 0.5),
             title="method (colour family = group:\nblue training-free, green adapted,\n"
             "red/grey from scratch)", title_fontsize=8, frameon=False)
  fig.tight_layout()
  fig.savefig(out_path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return True


def _binomial_ci(p: float, n: int) -> float:
  return 1.96 * math.sqrt(max(p * (1 - p), 0.0) / n) if n else 0.0


def plot_per_font(dg: dict, out_path: str) -> bool:
  """Zero-shot accuracy per held-out font (± 95% CI), fonts labelled with their image count."""
  per = (dg or {}).get("per_font", {}).get("test_fonts")
  if not per:
    return False

  plt = _plt()
  counts = (dg.get("per_font_count") or {}).get("test_fonts") or {}
  variants = [v for v in ("pretrained", "finetune", "mldg", "wise_ft_0.5") if v in per]
  fonts = sorted(next(iter(per.values())).keys(), key=lambda f: (-counts.get(f, 0), f))
  x = np.arange(len(fonts))
  w = 0.8 / max(len(variants), 1)
  fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(fonts) + 2), 4.4))
  palette = ("#2171b5", "#238b45", "#d94801", "#6a51a3")
  for i, v in enumerate(variants):
    acc = [100 * per[v][f] for f in fonts]
    err = [100 * _binomial_ci(per[v][f], counts[f]) if f in counts else 0 for f in fonts]
    ax.bar(x + (i - (len(variants) - 1) / 2) * w, acc, w, yerr=err if counts else None,
           capsize=1.5, label=v, color=palette[i % len(palette)], error_kw={"lw": 0.7})
  ax.set_xticks(x)
  ax.set_xticklabels([f"{f}\n(n={counts[f]})" if f in counts else f for f in fonts],
                     rotation=60, ha="right", fontsize=8)
  ax.set_ylabel("zero-shot top-1 (%)")
  ax.set_title("test_fonts: zero-shot accuracy per held-out font"
               + (" (n = images; bars ± 95% CI)" if counts else ""))
  ax.legend(title="feature adaptor")
  ax.grid(alpha=.3, axis="y")
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)
  return True


def plot_wise_ft(dg: dict, out_path: str) -> bool:
  """WiSE-FT: zero-shot top-1 (± 95% CI) against the interpolation weight alpha
  (0 = pretrained, 1 = fine-tuned), one line per split; MLDG as a reference point."""
  zs = (dg or {}).get("zeroshot", {})
  alphas = {0.0: "pretrained", 1.0: "finetune"}
  for v in zs:
    if v.startswith("wise_ft_"):
      alphas[float(v[len("wise_ft_"):])] = v
  if len(alphas) < 3 or not all(v in zs for v in alphas.values()):
    return False
  plt = _plt()
  splits = sorted({sp for per in zs.values() for sp in per})
  fig, ax = plt.subplots(figsize=(6, 4))
  a_sorted = sorted(alphas)
  for k, sp in enumerate(splits):
    ys = [100 * zs[alphas[a]][sp]["top1"] for a in a_sorted]
    es = [100 * zs[alphas[a]][sp].get("ci95", 0.0) for a in a_sorted]
    c = ("#2171b5", "#d94801", "#238b45", "#6a51a3")[k % 4]
    ax.plot(a_sorted, ys, marker="o", color=c, label=sp)
    ax.fill_between(a_sorted, [y - e for y, e in zip(ys, es)], [y + e for y, e in zip(ys, es)],
                    color=c, alpha=.15)
    if "mldg" in zs and sp in zs["mldg"]:
      ax.errorbar([1.04], [100 * zs["mldg"][sp]["top1"]], yerr=[100 * zs["mldg"][sp].get("ci95", 0)],
                  marker="s", color=c, capsize=2, ls="none")
  ax.set_xlabel("alpha (0 = pretrained, 1 = fine-tuned on source fonts; square: MLDG)")
  ax.set_ylabel("zero-shot top-1 (%)")
  ax.set_title("WiSE-FT interpolation (band: 95% CI)")
  ax.grid(alpha=.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)
  return True


def plot_meta_training(curves: dict[str, list[dict]], out_path: str) -> bool:
  """Meta-training loss and query accuracy against the outer step, one line per run."""
  curves = {k: [r for r in rows if "loss" in r] for k, rows in curves.items()}
  curves = {k: rows for k, rows in curves.items() if rows}
  if not curves:
    return False
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  for k, (name, rows) in enumerate(sorted(curves.items())):
    c = ("#2171b5", "#a50f15", "#238b45")[k % 3]
    steps = [r["step"] for r in rows]
    axes[0].plot(steps, [r["loss"] for r in rows], color=c, label=name)
    if all("acc" in r for r in rows):
      axes[1].plot(steps, [100 * r["acc"] for r in rows], color=c, label=name)
  axes[0].set_ylabel("query loss (meta-batch mean)")
  axes[1].set_ylabel("query accuracy after adaptation (%)")
  for ax in axes:
    ax.set_xlabel("meta-training step")
    ax.grid(alpha=.3)
    ax.legend()
  fig.suptitle("meta-training (training tasks)")
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)
  return True


def stage_times(run: str) -> dict[str, float]:
  """The latest wall time of each stage from ``stage_times.tsv`` (written by local.sh)."""
  out: dict[str, float] = {}
  path = os.path.join(run, "stage_times.tsv")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        parts = line.strip().split("\t")
        if len(parts) == 2:
          try:
            out[parts[0]] = float(parts[1])
          except ValueError:
            continue
  return out


def package_versions() -> str:
  """``python 3.11.x, jax 0.10.2, ...`` of the packages that determine the numbers."""

  out = [f"python {platform.python_version()}"]
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
              "tensorflow-datasets", "numpy", "sentencepiece", "pillow", "fszjax"):
    try:
      out.append(f"{pkg} {metadata.version(pkg)}")
    except metadata.PackageNotFoundError:
      continue
  return ", ".join(out)


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
