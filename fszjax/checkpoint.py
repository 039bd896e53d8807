"""Orbax checkpoints: async saves, keep last K + best, exact resume, restore onto any mesh.

A checkpoint step directory holds three items:
  state   the TrainState (params, optimizer state, step, RNG) as sharded arrays
  data    the grain iterator state (exact resume of the input pipeline)
  config  the resolved config (JSON)

Restoring takes *abstract* targets (`jax.ShapeDtypeStruct` with the shardings of the
current mesh), so a checkpoint written on 8 devices restores on 1 and vice versa.
A latest checkpoint that cannot be read (corrupt, truncated) is reported in one line
and the previous complete one is used; Orbax never lists half-written (uncommitted)
steps, so a crash during a save leaves the earlier checkpoints intact.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from fszjax.errors import UserError

log = logging.getLogger("fszjax")
_DATA_FILE = re.compile(r"process_\d+-of-(\d+)\.json")


class CheckpointError(UserError):
  """No usable checkpoint where one was expected; the message names the fix."""


def _grain_args():
  import grain  # lazy: not needed to restore params only

  return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with fszjax's items and policies."""

  def __init__(self, directory: str, save_every: int = 1000, keep: int = 3,
               best_metric: str | None = None, best_mode: str = "max",
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    policies: list[Any] = [cm.LatestN(max(int(keep), 1))]
    if best_metric:
      policies.append(cm.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                               n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(save_every), 1),
        preservation_policy=cm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only)
    self.best_metric = best_metric
    self.manager = ocp.CheckpointManager(self.directory, options=options)

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
    items = {"state": ocp.args.StandardSave(state)}
    if iterator is not None:
      save_cls, _ = _grain_args()
      items["data"] = save_cls(iterator)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config.to_dict() if hasattr(config, "to_dict") else config)
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      metrics = None
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def restore(self, abstract_state, iterator=None, step: int | None = None):
    """Restores ``(step, state)``; the iterator (if given) is restored in place.

    With ``step=None`` tries the latest step and falls back to earlier ones when a
    checkpoint cannot be read.
    """
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}; run `fszjax pretrain` first "
                            "or pass --checkpoint with a checkpoint directory")
    errors = []
    for s in steps:
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      saved_by = self._data_process_count(s) if iterator is not None else None
      if iterator is not None and saved_by in (None, jax.process_count()):
        _, restore_cls = _grain_args()
        items["data"] = restore_cls(iterator)
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(**items))
        if "data" not in items and iterator is not None:
          self._restore_data_resharded(s, iterator, saved_by)
        if errors:
          log.warning("restored the earlier complete checkpoint at step %d", s)
        return s, restored["state"]
      except Exception as e:  # pylint: disable=broad-except
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        log.warning("checkpoint step %d in %s is corrupt or incomplete (%s); falling back to "
                    "the previous one", s, self.directory, msg)
        errors.append((s, msg))
    raise CheckpointError(
        f"no readable checkpoint in {self.directory} (tried steps {[s for s, _ in errors]}: "
        f"{errors[0][1]}); delete the directory to start over")

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
    import json

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
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def resolve_step_dir(path: str) -> str:
  """workdir | workdir/checkpoints | workdir/checkpoints/<step> -> the step directory."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint path {path} does not exist; check --config.init_from / "
                          "--checkpoint")
  if os.path.isdir(os.path.join(path, "state")):
    return path
  for base in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(base):
      steps = sorted((int(d) for d in os.listdir(base) if d.isdigit()), reverse=True)
      for s in steps:
        if os.path.isdir(os.path.join(base, str(s), "state")):
          return os.path.join(base, str(s))
  raise CheckpointError(f"no checkpoint found under {path}; pass a fszjax workdir, its "
                        "checkpoints/ directory or one step directory")


def load_params_numpy(path: str) -> dict:
  """The ``params`` of a fszjax checkpoint (workdir, checkpoints dir or step dir) as numpy
  arrays on the host, whatever mesh wrote them."""
  import numpy as np

  step_dir = resolve_step_dir(path)
  item_dir = os.path.join(step_dir, "state")
  ckptr = ocp.PyTreeCheckpointer()
  try:
    meta = ckptr.metadata(item_dir)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = ckptr.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"cannot read the checkpoint at {step_dir} ({str(e).splitlines()[0][:160]}); "
                          "pass a complete fszjax checkpoint") from None
  return restored["params"]
