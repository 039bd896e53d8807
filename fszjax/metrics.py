"""Metrics: JSONL + TensorBoard writers, a progress bar and learning-curve plots.

Only process 0 writes; other processes get no-op writers.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable


def _clean(v):
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


class MetricWriter:
  """Appends one JSON object per call to ``workdir/<name>.jsonl``; scalars also to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True, name: str = "metrics",
               tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, f"{name}.jsonl")
    self._tb = None
    if enabled and tensorboard:
      try:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # optional
        self._tb = None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _clean(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops rows past `step` (a resumed run rewrites what the crashed run logged)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    rows = read_jsonl(self.path)
    with open(self.path, "w") as f:
      for r in rows:
        if r.get("step", 0) <= step:
          f.write(json.dumps(r) + "\n")

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  rows = []
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          continue  # a line cut by a crash
  return rows


class Progress:
  """A tqdm progress bar on process 0 (silent elsewhere or when not a terminal and disabled)."""

  def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "pretrain"):
    self.bar = None
    if enabled:
      from tqdm import tqdm

      self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                      mininterval=2.0)

  def update(self, n: int = 1, **postfix):
    if self.bar is not None:
      if postfix:
        self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                              for k, v in postfix.items()}, refresh=False)
      self.bar.update(n)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _series(rows: Iterable[dict], key: str):
  xs, ys = [], []
  for r in rows:
    v = r.get(key)
    if isinstance(v, (int, float)) and math.isfinite(v):
      xs.append(r["step"])
      ys.append(v)
  return xs, ys


def plot_report(metrics_path: str, out_path: str, title: str = "") -> str:
  """Learning curves (loss, lr, in-batch accuracy) and zero-shot accuracy over steps."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_jsonl(metrics_path)
  zs_keys = sorted({k for r in rows for k in r if k.startswith("zeroshot/") and k.endswith("/top1")})
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  ax = axes[0]
  ax.plot(*_series(rows, "loss"), label="train loss")
  ax.set_xlabel("step"); ax.set_ylabel("loss"); ax.set_title("training loss"); ax.grid(alpha=.3)
  ax = axes[1]
  ax.plot(*_series(rows, "i2t_acc"), label="in-batch image->text top-1")
  ax2 = ax.twinx()
  ax2.plot(*_series(rows, "lr"), color="gray", ls="--", label="learning rate")
  ax.set_xlabel("step"); ax.set_title("in-batch accuracy and lr"); ax.grid(alpha=.3)
  ax.legend(loc="upper left"); ax2.legend(loc="lower right")
  ax = axes[2]
  for k in zs_keys:
    split = k.split("/")[1]
    xs, ys = _series(rows, k)
    ax.plot(xs, ys, marker="o", label=f"{split}")
    chance = _series(rows, f"zeroshot/{split}/chance")[1]
    if chance:
      ax.axhline(chance[-1], ls=":", color=ax.lines[-1].get_color(), alpha=.6)
  ax.set_xlabel("step"); ax.set_ylabel("top-1"); ax.set_title("zero-shot accuracy (dotted: chance)")
  ax.grid(alpha=.3)
  if zs_keys:
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)
  return out_path


def flatten_eval(evals: dict) -> dict[str, float]:
  """``{"zeroshot": {split: {k: v}}}`` -> ``{"zeroshot/split/k": v}`` (numbers only)."""
  out = {}
  for group, splits in evals.items():
    for split, vals in splits.items():
      for k, v in vals.items():
        if isinstance(v, (int, float)):
          out[f"{group}/{split}/{k}"] = v
  return out
