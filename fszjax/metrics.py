"""Metrics and the log: JSONL + TensorBoard writers, progress with ETA, stage timers,
learning-curve plots, and the logging setup of the command line.

Only process 0 writes; other processes get no-op writers.

The log (`setup_logging`): fszjax's own loggers at INFO, third-party loggers at WARNING,
one line per record with a timestamp; progress bars (tqdm, TFDS) and terminal escape codes
only when stderr is a terminal. Long loops log ``done/total, elapsed, ETA`` lines instead
(`Progress`), and every stage says what it does and how long it took (`timed`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from typing import Any, Iterable

log = logging.getLogger("fszjax")

# Third-party loggers that log at INFO (TFDS, absl, Orbax, JAX, grain, ...): WARNING and up.
THIRD_PARTY_LOGGERS = ("absl", "orbax", "jax", "jaxlib", "tensorflow", "tensorflow_datasets",
                       "grain", "etils", "matplotlib", "PIL", "fontTools", "urllib3", "h5py",
                       "torch", "open_clip", "tensorboardX")
_HANDLER_MARK = "_fszjax_handler"


def is_terminal(stream=None) -> bool:
  """Whether `stream` (default stderr, where the log and progress bars go) is a terminal."""
  stream = sys.stderr if stream is None else stream
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):
    return False


def setup_logging(level: int = logging.INFO) -> None:
  """Configures the log of a command (idempotent).

  The root logger (every third-party library) is at WARNING, the ``fszjax`` logger at
  `level`; one stderr handler writes ``HH:MM:SS LEVEL name: message``. When stderr is not
  a terminal, tqdm bars are disabled (``TQDM_DISABLE``) and TFDS's progress bars too.
  """
  root = logging.getLogger()
  # A library imported before this call may have run `logging.basicConfig()`, leaving a
  # second stderr handler that would print every line twice ("INFO:fszjax:...").
  for h in list(root.handlers):
    if (type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.__stderr__)
        and not getattr(h, _HANDLER_MARK, False)):
      root.removeHandler(h)
  if not any(getattr(h, _HANDLER_MARK, False) for h in root.handlers):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
  root.setLevel(logging.WARNING)
  logging.getLogger("fszjax").setLevel(level)
  for name in THIRD_PARTY_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
  if not is_terminal():
    disable_progress_bars()


def disable_progress_bars() -> None:
  """No tqdm / TFDS progress bars (their carriage returns and escape codes) in this process."""
  os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads it as the default of `disable`
  if "tensorflow_datasets" in sys.modules:  # only if already imported: it is heavy
    sys.modules["tensorflow_datasets"].disable_progress_bar()


def format_duration(seconds: float) -> str:
  """``"45.2 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``."""
  s = max(float(seconds), 0.0)
  if s < 60:
    return f"{s:.1f} s"
  if s < 3600:
    return f"{int(s // 60)} min {int(s % 60):02d} s"
  return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def eta(done: int, total: int, elapsed_s: float) -> str:
  """Remaining time of a loop at constant speed (``"?"`` before the first item is done)."""
  if done <= 0 or elapsed_s <= 0:
    return "?"
  return format_duration(elapsed_s / done * max(total - done, 0))


@contextlib.contextmanager
def timed(what: str, logger: logging.Logger | None = None, enabled: bool = True):
  """Logs ``<what> ...`` on entry and ``<what>: done in <time>`` on exit (INFO).

  Yields a dict; the caller may put a ``"result"`` string in it to append to the last line.
  """
  logger = logger or log
  info: dict[str, Any] = {}
  if enabled:
    logger.info("%s ...", what)
  t0 = time.perf_counter()
  yield info
  info["seconds"] = time.perf_counter() - t0
  if enabled:
    extra = f" ({info['result']})" if info.get("result") else ""
    logger.info("%s: done in %s%s", what, format_duration(info["seconds"]), extra)


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
        from tensorboardX import SummaryWriter  # optional: TensorBoard event files only

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
  """Progress of a long loop on process 0 (silent elsewhere or when disabled).

  On a terminal: a tqdm bar. Otherwise (a log file, CI): a plain log line at most every
  `every_s` seconds, ``<desc>: 120/500 (24%), 1 min 05 s elapsed, ETA 3 min 26 s, loss 2.31``.
  """

  def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "pretrain",
               every_s: float = 30.0, terminal: bool | None = None, logger=None):
    self.bar = None
    self.enabled = enabled
    self.total, self.done, self.initial = int(total), int(initial), int(initial)
    self.desc, self.every_s = desc, float(every_s)
    self.logger = logger or log
    self.postfix: dict = {}
    self.t0 = self.t_last = time.perf_counter()
    terminal = is_terminal() if terminal is None else terminal
    if enabled and terminal and os.environ.get("TQDM_DISABLE", "") in ("", "0"):
      from tqdm import tqdm  # optional: progress bars on a terminal only

      self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                      mininterval=2.0)

  def line(self) -> str:
    """``desc: done/total (p%), elapsed, ETA[, postfix]``."""
    elapsed = time.perf_counter() - self.t0
    pct = 100.0 * self.done / max(self.total, 1)
    out = (f"{self.desc}: {self.done}/{self.total} ({pct:.0f}%), {format_duration(elapsed)} "
           f"elapsed, ETA {eta(self.done - self.initial, self.total - self.initial, elapsed)}")
    if self.postfix:
      out += ", " + ", ".join(f"{k} {v}" for k, v in self.postfix.items())
    return out

  def update(self, n: int = 1, **postfix):
    if not self.enabled:
      return
    self.done += n
    if postfix:
      self.postfix.update({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()})
    if self.bar is not None:
      if postfix:
        self.bar.set_postfix(self.postfix, refresh=False)
      self.bar.update(n)
      return
    now = time.perf_counter()
    if n and (now - self.t_last >= self.every_s or self.done >= self.total):
      self.t_last = now
      self.logger.info("%s", self.line())

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
  import matplotlib  # heavy, optional: plots only

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # heavy, optional: plots only

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
    ys = [100 * y for y in ys]
    line, = ax.plot(xs, ys, marker="o", ms=3, label=f"{split}")
    ci = dict(zip(*_series(rows, f"zeroshot/{split}/top1_ci95")))
    if ci and all(x in ci for x in xs):
      ax.fill_between(xs, [y - 100 * ci[x] for x, y in zip(xs, ys)],
                      [y + 100 * ci[x] for x, y in zip(xs, ys)], color=line.get_color(), alpha=.18)
    chance = _series(rows, f"zeroshot/{split}/chance")[1]
    if chance:
      ax.axhline(100 * chance[-1], ls=":", color=line.get_color(), alpha=.6)
  ax.set_xlabel("step"); ax.set_ylabel("top-1 (%)")
  ax.set_title("zero-shot accuracy over all classes\n(band: 95% CI; dotted: chance)")
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
