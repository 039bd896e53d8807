"""The outputs of `fszjax adapt`: ``results.json``, ``results.md`` (markdown tables) and
``accuracy_vs_shots.png``."""

from __future__ import annotations

import json
import os

from fszjax.fewshot.episodes import parse_setting


def results_markdown(results: dict) -> str:
  methods = results.get("methods", {})
  splits = sorted({s for m in methods.values() for s in m})
  settings = sorted({st for m in methods.values() for s in m.values() for st in s},
                    key=lambda s: parse_setting(s))
  lines = []
  for split in splits:
    lines.append(f"\n### {split}\n")
    lines.append("| method | " + " | ".join(settings) + " |")
    lines.append("|---|" + "---:|" * len(settings))
    for name, per_split in methods.items():
      if split not in per_split:
        continue
      cells = []
      for st in settings:
        r = per_split[split].get(st)
        cells.append(f"{100 * r['mean']:.1f} ± {100 * r['ci95']:.1f}" if r else "")
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  if "zeroshot_top1" in results:
    lines.append("\n### zero-shot top-1 over each split's full class list\n")
    lines.append("| split | top-1 | classes | chance |")
    lines.append("|---|---:|---:|---:|")
    for sp, r in results["zeroshot_top1"].items():
      lines.append(f"| {sp} | {100 * r['top1']:.2f} ± {100 * r['ci95']:.2f} | "
                   f"{r['num_classes']} | {100 * r['chance']:.2f} |")
  if "dg" in results:
    dg = results["dg"]
    lines.append("\n### domain generalisation (held-out fonts): zero-shot top-1 and few-shot\n")
    dsplits = sorted({sp for v in dg["zeroshot"].values() for sp in v})
    few_cols = [(sp, m, st) for sp in dsplits for m in ("protonet", "zs_head_adapt")
                for st in sorted({st for v in dg["fewshot"].values()
                                  for st in v.get(m, {}).get(sp, {})})]
    lines.append("| variant | " + " | ".join(f"{sp} zero-shot" for sp in dsplits) + " | " +
                 " | ".join(f"{sp} {m} {st}" for sp, m, st in few_cols) + " |")
    lines.append("|---|" + "---:|" * (len(dsplits) + len(few_cols)))
    for name in dg["zeroshot"]:
      zs = [f"{100 * dg['zeroshot'][name][sp]['top1']:.2f}" for sp in dsplits]
      fw = []
      for sp, m, st in few_cols:
        r = dg["fewshot"][name].get(m, {}).get(sp, {}).get(st)
        fw.append(f"{100 * r['mean']:.1f} ± {100 * r['ci95']:.1f}" if r else "")
      lines.append(f"| {name} | " + " | ".join(zs + fw) + " |")
  return "\n".join(lines) + "\n"


def plot_shots(results: dict, out_path: str) -> None:
  import matplotlib  # lazy: matplotlib is only needed for the plot

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # lazy: after choosing the Agg backend

  methods = results.get("methods", {})
  splits = sorted({s for m in methods.values() for s in m})
  if not splits:
    return
  fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.6), squeeze=False)
  for ax, split in zip(axes[0], splits):
    for name, per_split in methods.items():
      res = per_split.get(split, {})
      pts = sorted(((parse_setting(st), r) for st, r in res.items() if parse_setting(st)[0] == 5),
                   key=lambda x: x[0][1])
      if pts:
        ax.errorbar([p[0][1] for p in pts], [100 * p[1]["mean"] for p in pts],
                    yerr=[100 * p[1]["ci95"] for p in pts], marker="o", capsize=3, label=name)
    ax.set_title(f"{split} (5-way)")
    ax.set_xlabel("shots")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)


def write_results(results: dict, workdir: str) -> None:
  """``W/results.json``, ``W/results.md`` and ``W/accuracy_vs_shots.png``."""
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(results_markdown(results))
  plot_shots(results, os.path.join(workdir, "accuracy_vs_shots.png"))
