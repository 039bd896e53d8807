"""Orbax checkpoints: async saves, keep last K + best, exact resume, restore onto any mesh.

A checkpoint step directory holds three items:
  state   the TrainState (params, optimizer state, step, RNG) as sharded arrays
  data    the grain iterator state (exact resume of the input pipeline)
  config  the resolved config (JSON)

Restoring takes *abstract* targets (`jax.ShapeDtypeStruct` with the shardings of the
current mesh), so a checkpoint written on 8 devices restores on 1 and vice versa.
Faults (README "Faults and recovery"):

* A newest step that cannot be read (corrupt, truncated) is *moved aside* to
  ``<step>.corrupt-<time>`` (a name Orbax does not list; never deleted, so a person can
  inspect it) once an earlier step has restored, with one warning line naming both; the
  run continues from that earlier step and saves the later steps again. Read-only users
  (`fszjax eval`, `fszjax.load`) fall back the same way without moving anything. On several
  processes every process tries the step and they agree (all must succeed) before any
  moves. Orbax never lists half-written (uncommitted) steps, so a crash during a save
  leaves the earlier checkpoints intact.
* The keep policy keeps at least two steps, so the newest is never the only survivor.
* A save that fails for lack of space, permission or an I/O error raises a one-line
  `StorageError` naming the path and the space needed (``on_save_error="stop"``), or
  logs that line and retries at the next save (``"retry"``); the partial step is removed
  and the previous checkpoints are untouched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from typing import Any

import numpy as np

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as cm

from fszjax import workdir
from fszjax.errors import UserError

log = logging.getLogger("fszjax")
_DATA_FILE = re.compile(r"process_\d+-of-(\d+)\.json")


class CheckpointError(UserError):
  """No usable checkpoint where one was expected; the message names the fix."""


class StorageError(UserError):
  """A checkpoint could not be written (disk full, permission, I/O error)."""


_STORAGE_WORDS = workdir.STORAGE_WORDS
storage_fault = workdir.storage_fault


# After a failed save, TensorStore writes still in flight finish on a closed event loop
# or after the interpreter began to exit; these follow-ups of the failure are dropped.
_AFTERMATH = ("Event loop is closed", "cannot schedule new futures after")
_failed_save = False


class _QuietStorageFaults(logging.Filter):
  """Drops Orbax's / asyncio's multi-line tracebacks of a storage failure: `Checkpointer`
  reports each such failure in one line of its own (README "Faults and recovery")."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None and storage_fault(exc) is not None:
      return False
    try:
      text = record.getMessage()
    except Exception:  # pylint: disable=broad-except
      return True
    if _failed_save and any(w in text for w in _AFTERMATH):
      return False
    return not any(w in text for w in _STORAGE_WORDS)


for _name in ("absl", "asyncio"):
  logging.getLogger(_name).addFilter(_QuietStorageFaults())


def _quiet_aftermath() -> None:
  """From now on, unraisable errors that only echo a failed save are not printed."""
  global _failed_save
  if _failed_save:
    return
  _failed_save = True
  previous = sys.unraisablehook

  def hook(unraisable):
    if any(w in str(unraisable.exc_value) for w in _AFTERMATH):
      return
    previous(unraisable)

  sys.unraisablehook = hook


def _join_save_threads(timeout_s: float = 60.0) -> None:
  """Waits for Orbax's background save threads (a failed save leaves some running)."""
  deadline = time.time() + timeout_s
  for t in threading.enumerate():
    if t is threading.current_thread() or t.daemon and not type(t).__module__.startswith("orbax"):
      continue
    if type(t).__module__.startswith("orbax") or t.name.startswith("asyncio_"):
      try:
        t.join(max(0.0, deadline - time.time()))
      except Exception:  # pylint: disable=broad-except
        pass  # Orbax's threads re-raise the failure being handled


def _first_line(e: BaseException, n: int = 160) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:n] if text else type(e).__name__


def tree_nbytes(tree) -> int:
  """Bytes of all array leaves (global shapes), e.g. the size of a checkpointed state."""
  total = 0
  for x in jax.tree.leaves(tree):
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      total += int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def _all_processes_agree(ok: bool) -> bool:
  """True iff `ok` on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _grain_args():
  import grain  # lazy: not needed to restore params only

  return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with fszjax's items and policies.

  ``on_save_error``: "stop" raises `StorageError` when a save fails for lack of space,
  permission or an I/O error; "retry" logs the same line and tries again at the next save.
  """

  def __init__(self, directory: str, save_every: int = 1000, keep: int = 3,
               best_metric: str | None = None, best_mode: str = "max",
               async_save: bool = True, read_only: bool = False, on_save_error: str = "stop"):
    if on_save_error not in ("stop", "retry"):
      raise UserError(f"config.checkpoint.on_save_error={on_save_error!r}; use 'stop' or 'retry'")
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    self.on_save_error = on_save_error
    # At least two: if the newest step later turns out unreadable, its predecessor remains.
    policies: list[Any] = [cm.LatestN(max(int(keep), 2))]
    if best_metric:
      policies.append(cm.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                               n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(save_every), 1),
        preservation_policy=cm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only)
    self.best_metric = best_metric
    self.state_bytes = 0  # set by the caller (or the first save) for the space estimate
    self._pending: int | None = None  # step of an async save not yet known to be complete
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    except Exception as e:  # pylint: disable=broad-except
      reason = storage_fault(e)
      if reason is None:
        raise
      raise StorageError(f"cannot use the checkpoint directory {self.directory} ({reason}); "
                         "fix its permissions or pass another --workdir") from None

  # -- queries
  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  # -- save / restore
  def save(self, step: int, state, iterator=None, config=None, metrics=None, force=False) -> bool:
    """Saves `step` (asynchronously if configured). Returns whether a save was started.

    A storage failure (of this save, or of the previous async one, which surfaces here)
    is handled as ``on_save_error`` says.
    """
    self.state_bytes = self.state_bytes or tree_nbytes(state)
    items = {"state": ocp.args.StandardSave(state)}
    if iterator is not None:
      save_cls, _ = _grain_args()
      items["data"] = save_cls(iterator)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config.to_dict() if hasattr(config, "to_dict") else config)
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      metrics = None
    try:
      started = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                                  force=force)
    except Exception as e:  # pylint: disable=broad-except
      failed = self._pending if self._pending is not None and self._pending != step else step
      self._pending = None
      self._save_failed(failed, e)
      if failed != step:  # the previous async save failed; this one was not attempted
        return self.save(step, state, iterator, config, metrics, force)
      return False
    self._pending = step if started else self._pending
    return started

  def _save_failed(self, step: int, e: BaseException) -> None:
    """Removes the partial step, then raises `StorageError` or logs it (``retry``)."""
    reason = storage_fault(e)
    if reason is None:
      raise e
    _quiet_aftermath()
    _join_save_threads()  # writes still in flight would fail again in a removed directory
    removed = self._remove_partial(step)
    try:
      self.manager.reload()
    except Exception:  # pylint: disable=broad-except
      pass
    need = 2 * self.state_bytes
    try:
      free = workdir.mb(workdir.free_bytes(self.directory))
    except OSError:
      free = "unknown"
    kept = self.all_steps()
    prev = f"step {kept[-1]} is intact" if kept else "no earlier checkpoint exists"
    msg = (f"cannot write checkpoint step {step} to {self.directory} ({reason}); free space or "
           f"fix permissions there (checkpoints need about {workdir.mb(need)} for two steps, "
           f"{free} free){' - the partial step was removed' if removed else ''}; {prev}")
    if self.on_save_error == "retry":
      log.warning("%s; retrying at the next save (config.checkpoint.on_save_error=retry)", msg)
      return
    self._shutdown_quietly()
    # A background write that was still running when the partial step was first removed
    # can recreate its directory; with Orbax's threads stopped, remove it for good.
    self._remove_partial(step)
    raise StorageError(f"{msg}; rerun the same command to resume, or set "
                       "config.checkpoint.on_save_error=retry to keep training") from None

  def _shutdown_quietly(self) -> None:
    """Stops Orbax's background threads after a failed save, so that none is left to
    report the same failure again (as a traceback) while the interpreter exits."""
    for fn in (self.manager.wait_until_finished, self.manager.close):
      try:
        fn()
      except Exception:  # pylint: disable=broad-except
        pass
    self._closed = True

  def _remove_partial(self, step: int) -> bool:
    """Deletes the uncommitted (temporary) directory of a failed save of `step`."""
    if jax.process_index() != 0 or not os.path.isdir(self.directory):
      return False
    removed = False
    for name in os.listdir(self.directory):
      if name.startswith(f"{step}.orbax-checkpoint-tmp"):
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        removed = True
    return removed

  def restore(self, abstract_state, iterator=None, step: int | None = None):
    """Restores ``(step, state)``; the iterator (if given) is restored in place.

    With ``step=None`` tries the latest step and falls back to earlier ones when a
    checkpoint cannot be read; unreadable newer steps are then moved aside (unless
    read-only). All processes agree on the step.
    """
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}; run `fszjax pretrain` first "
                            "or pass --checkpoint with a checkpoint directory")
    errors: list[tuple[int, str]] = []
    for s in steps:
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      saved_by = self._data_process_count(s) if iterator is not None else None
      if iterator is not None and saved_by in (None, jax.process_count()):
        _, restore_cls = _grain_args()
        items["data"] = restore_cls(iterator)
      restored, msg = None, ""
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(**items))
        if "data" not in items and iterator is not None:
          self._restore_data_resharded(s, iterator, saved_by)
      except Exception as e:  # pylint: disable=broad-except
        msg = _first_line(e)
      if _all_processes_agree(restored is not None):
        if errors:
          self._report_fallback(errors, s)
        return s, restored["state"]
      errors.append((s, msg or "unreadable on another process"))
    raise CheckpointError(
        f"no readable checkpoint in {self.directory} (tried steps {[s for s, _ in errors]}: "
        f"{errors[0][1]}); if the config changed since they were written, restore it; to "
        "start over pass --fresh or another --workdir")

  def _report_fallback(self, errors: list[tuple[int, str]], good: int) -> None:
    bad = [s for s, _ in errors]
    if self.read_only:
      log.warning("checkpoint step(s) %s in %s are corrupt or incomplete (%s); using step %d",
                  bad, self.directory, errors[0][1], good)
      return
    moved = self.set_aside(bad, "corrupt")
    log.warning("checkpoint step(s) %s in %s are corrupt or incomplete (%s); moved aside to %s; "
                "resuming from step %d", bad, self.directory, errors[0][1],
                ", ".join(os.path.basename(m) for m in moved), good)

  def set_aside(self, steps, why: str) -> list[str]:
    """Renames the step directories `steps` to ``<step>.<why>-<time>`` (which Orbax does
    not list) and reloads. Never deletes. Returns the new paths (on every process)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for s in sorted(steps):
      src = os.path.join(self.directory, str(s))
      dst = f"{src}.{why}-{stamp}"
      k = 1
      while os.path.exists(dst):
        dst, k = f"{src}.{why}-{stamp}-{k}", k + 1
      moved.append(dst)
      if jax.process_index() == 0 and os.path.exists(src):
        os.rename(src, dst)
    _sync(f"fszjax_checkpoint_set_aside_{why}_{stamp}")
    self.manager.reload()
    return moved

  # -- data-iterator state written by a different number of processes
  def _data_process_count(self, step: int) -> int | None:
    """How many processes wrote the data-iterator state of `step` (None if unknown)."""
    d = os.path.join(self.directory, str(step), "data")
    names = os.listdir(d) if os.path.isdir(d) else []
    counts = {m.group(1) for m in map(_DATA_FILE.fullmatch, names) if m}
    return int(counts.pop()) if len(counts) == 1 else None

  def _restore_data_resharded(self, step: int, iterator, saved_by: int) -> None:
    """Moves `iterator` to the data position of a checkpoint written by `saved_by` processes.

    Process p of P reads examples p, p + P, p + 2P, ... of one global stream, so after n
    examples per process the global stream is consumed up to P * n: each of the new
    processes resumes at that global position divided by their number.
    """
    d = os.path.join(self.directory, str(step), "data")
    try:
      states = []
      for i in range(saved_by):
        with open(os.path.join(d, f"process_{i}-of-{saved_by}.json")) as f:
          states.append(json.load(f))
      consumed = saved_by * min(int(st["pipeline"]["next_index"]) for st in states)
      state = iterator.get_state()
      state["pipeline"]["next_index"] = consumed // jax.process_count()
      iterator.set_state(state)
    except Exception as e:  # pylint: disable=broad-except
      log.warning("the data-iterator state of step %d was written by %d processes and cannot be "
                  "moved to %d (%s); the input pipeline starts from its beginning", step,
                  saved_by, jax.process_count(), str(e)[:120])
      return
    if consumed % jax.process_count():
      log.warning("step %d: %d examples consumed by %d processes do not split evenly over %d; "
                  "a few examples are seen twice", step, consumed, saved_by, jax.process_count())
    log.info("data position of step %d moved from %d to %d processes", step, saved_by,
             jax.process_count())

  def wait(self):
    """Waits for an async save; its storage failure is handled as ``on_save_error`` says."""
    if getattr(self, "_closed", False):
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      failed, self._pending = self._pending, None
      self._save_failed(failed if failed is not None else -1, e)
    self._pending = None

  def close(self):
    if getattr(self, "_closed", False):
      return
    try:
      self.wait()
    finally:
      if not getattr(self, "_closed", False):
        self.manager.close()
        self._closed = True


def step_dirs(path: str) -> list[str]:
  """workdir | workdir/checkpoints | workdir/checkpoints/<step> -> the step directories to
  try, newest first (just the one for a step directory)."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint path {path} does not exist; check --config.init_from / "
                          "--checkpoint")
  if os.path.isdir(os.path.join(path, "state")):
    return [path]
  for base in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(base):
      steps = sorted((int(d) for d in os.listdir(base) if d.isdigit()), reverse=True)
      found = [os.path.join(base, str(s)) for s in steps
               if os.path.isdir(os.path.join(base, str(s), "state"))]
      if found:
        return found
  kind = "directory" if os.path.isdir(path) else "file"
  raise CheckpointError(f"{path} is a {kind} without a fszjax checkpoint; pass a fszjax workdir, "
                        "its checkpoints/ directory, one step directory or a `fszjax convert` "
                        "output")


def resolve_step_dir(path: str) -> str:
  """workdir | workdir/checkpoints | workdir/checkpoints/<step> -> the (newest) step directory."""
  return step_dirs(path)[0]


def load_params_numpy(path: str) -> dict:
  """The ``params`` of a fszjax checkpoint (workdir, checkpoints dir or step dir) as numpy
  arrays on the host, whatever mesh wrote them. A newest step that cannot be read is
  skipped for the previous one (one warning line); nothing is moved."""
  candidates = step_dirs(path)
  errors = []
  for step_dir in candidates:
    try:
      params = _read_params(step_dir)
    except Exception as e:  # pylint: disable=broad-except
      errors.append((step_dir, _first_line(e)))
      continue
    if errors:
      log.warning("checkpoint %s is corrupt or incomplete (%s); using %s instead",
                  errors[0][0], errors[0][1], step_dir)
    return params
  raise CheckpointError(f"cannot read the checkpoint at {errors[0][0]} ({errors[0][1]}); "
                        "pass a complete fszjax checkpoint")


def _read_params(step_dir: str) -> dict:
  item_dir = os.path.join(step_dir, "state")
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(item_dir)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  restored = ckptr.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return restored["params"]
