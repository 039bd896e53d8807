"""Contrastive pretraining: the training loop (checkpoint / resume, preemption, Ctrl-C,
NaN and spike handling, metrics, periodic and final evaluation).

The train state and optimizer live in `fszjax.train_state`, the jitted step in
`fszjax.train_step`; their public names are re-exported here for callers of
`fszjax.pretrain`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import time
from typing import Any

import jax
from jax.sharding import Mesh

from fszjax import checkpoint, evaluate, flops, interrupt, sharding
from fszjax import loop as loop_lib
from fszjax import config as config_lib
from fszjax import metrics as metrics_lib
from fszjax import text as tokenizer_lib
from fszjax import workdir as workdir_lib
from fszjax.data import pipeline, sources, vocab
from fszjax.errors import UserError
from fszjax.models.two_tower import build_model
from fszjax.train_state import (TrainState, abstract_train_state, create_train_state,
                                decay_mask, frozen_labels, init_params_from, input_shapes,
                                make_optimizer, make_schedule)
from fszjax.train_step import in_batch_accuracy, make_loss_and_grads, make_train_step

__all__ = [
    "LossMonitor", "TrainState", "TrainingDiverged", "abstract_train_state", "build_model",
    "create_train_state", "decay_mask", "frozen_labels", "in_batch_accuracy",
    "init_params_from", "input_shapes", "make_loss_and_grads", "make_optimizer",
    "make_schedule", "make_train_step", "throughput_fields", "train",
]


class TrainingDiverged(UserError):
  """The loss spiked or became NaN/inf; checkpoints written after the last good loss are
  moved aside and the message names the step a rerun resumes from."""

  def __init__(self, message: str, loss: float = float("nan"), step: int = 0):
    super().__init__(message)
    self.loss, self.step = loss, step


class LossMonitor:
  """Divergence detection on the losses the loop fetches (log and save steps).

  A loss *spikes* when it is NaN/inf, or when it exceeds ``factor`` times the median of
  the last ``window`` good losses and that median by more than ``min_jump`` (so a run
  whose loss is near zero does not trip on noise). ``last_ok`` is the latest step whose
  loss was good: the loss of step s is computed with the params of checkpoint s - 1, so
  checkpoints at ``last_ok`` and later are not known to be good once a spike is seen.
  """

  def __init__(self, factor: float = 10.0, window: int = 20, min_jump: float = 1.0,
               start: int = 0, history=()):
    self.factor, self.window, self.min_jump = float(factor), int(window), float(min_jump)
    self.history = [float(x) for x in history][-self.window:]
    self.last_ok = start

  def median(self) -> float | None:
    return statistics.median(self.history) if self.history else None

  def check(self, loss: float, step: int) -> None:
    med = self.median()
    if not math.isfinite(loss):
      raise TrainingDiverged(f"loss is {loss} at step {step}", loss, step)
    if (self.factor > 0 and med is not None and loss > self.factor * med
        and loss - med > self.min_jump):
      raise TrainingDiverged(f"loss is {loss:.4g} at step {step}, more than "
                             f"{self.factor:g}x the median {med:.4g} of the recent losses", loss, step)
    self.history = (self.history + [loss])[-self.window:]
    self.last_ok = max(self.last_ok, step)


def throughput_fields(config, mesh: Mesh, steps: int, seconds: float,
                      peak_tflops: float | None = None) -> dict:
  """``model_tflops_per_device``: the analytic model FLOPs of `steps` train steps
  (`flops.train_flops_per_step`, recomputation not counted) per device per second, and
  ``mfu`` (that over the chip's peak dense bf16 TFLOP/s) where the peak is known: given,
  or from the device kind on an accelerator (none on the CPU)."""
  per_step = flops.train_flops_per_step(config.model, int(config.batch_size)) / 1e12
  achieved = per_step * steps / max(seconds, 1e-9) / mesh.devices.size
  out = {"model_tflops_per_device": achieved}
  if peak_tflops is None and jax.default_backend() != "cpu":
    peak_tflops = flops.peak_tflops(mesh.devices.flat[0].device_kind)
  if peak_tflops:
    out["mfu"] = achieved / peak_tflops
  return out


def _finite_or_raise(loss: float, step: int, monitor: LossMonitor) -> None:
  """Raises `TrainingDiverged` if `loss` (of `step`) is non-finite or a spike."""
  monitor.check(loss, step)


def _diverged(e: TrainingDiverged, ckpt, monitor: LossMonitor, lr: float) -> TrainingDiverged:
  """Moves the checkpoints from ``monitor.last_ok`` on aside and says how to continue."""
  ckpt.wait()
  suspect = [s for s in ckpt.all_steps() if s >= monitor.last_ok]
  moved = ckpt.set_aside(suspect, "diverged") if suspect else []
  good = ckpt.latest_step()
  aside = (f"checkpoint step(s) {suspect} (written after the last good loss, step "
           f"{monitor.last_ok}) moved aside to {moved[0]}{' ...' if len(moved) > 1 else ''}; "
           if moved else "")
  if good is not None:
    how = (f"rerunning the same command resumes from step {good} (the last checkpoint from "
           f"before the blow-up), and a changed --config.optim.lr (e.g. {lr / 10:g}) or a longer "
           "--config.optim.warmup_steps takes effect from there; or pass --fresh to start over")
  else:
    how = ("no checkpoint predates the blow-up, so rerunning starts over from step 0: lower "
           f"--config.optim.lr (e.g. {lr / 10:g}) or raise --config.optim.warmup_steps")
  return TrainingDiverged(f"{e}: training diverged; {aside}{how}", e.loss, e.step)


def train(config, workdir: str, *, stop_at: int | None = None) -> dict:
  """Runs (or resumes) pretraining in `workdir`. Returns the summary dict.

  ``stop_at`` ends the run after that step as if preempted (tests of exact resume).
  One run at a time writes a workdir: a second one refuses with one line
  (`fszjax.workdir.WorkdirLock`, taken by process 0, released by the OS if it dies).
  """
  with workdir_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0):
    return _train(config, workdir, stop_at=stop_at)


def _check_inputs(config) -> None:
  """Fail fast: the ``init_from`` checkpoint and every dataset split the config names
  (training and evaluation) are checked before the model is built."""
  src = config.get("init_from", "")
  if src:
    try:
      checkpoint.step_dirs(src)
    except checkpoint.CheckpointError as e:
      raise checkpoint.CheckpointError(f"config.init_from={src}: {e}") from None
  ecfg = config.get("eval", None)
  splits = list(ecfg.get("splits", ()) if ecfg is not None else ()) or list(
      config.data.get("eval_splits", ()) or ())
  if splits:  # the final evaluation always runs
    comp = sources.single_component(config.data)
    for split in splits:
      sources.open_split(comp, split)


@dataclasses.dataclass
class _Run:
  """What the pretraining loop carries from step to step."""
  config: Any
  workdir: str
  mesh: Mesh
  rules: Any
  is_main: bool
  train_iter: Any
  tokenizer: Any
  model: Any = None
  state: Any = None
  ckpt: Any = None
  writer: Any = None
  monitor: Any = None
  start: int = 0
  t_start: float = 0.0
  t_last: float = 0.0
  steps_since: int = 0
  eval_cache: dict = dataclasses.field(default_factory=dict)

  def evaluate(self) -> dict:
    with jax.set_mesh(self.mesh):
      with metrics_lib.timed(f"zero-shot evaluation at step {int(self.state.step)}", _log,
                             enabled=self.is_main):
        return evaluate.run_evaluators(self.config, self.model, self.state.params,
                                       self.tokenizer, arrays_cache=self.eval_cache)


_log = logging.getLogger("fszjax")


def _train(config, workdir: str, *, stop_at: int | None = None) -> dict:
  """`train` with the workdir lock held."""
  run = _prepare(config, workdir)
  step_fn = _restore_or_init(run)
  step, stopped_early, interrupted, last_eval = _loop(run, step_fn, stop_at)
  if interrupted:
    run.ckpt.close()
    run.writer.close()
    raise KeyboardInterrupt
  return _finish(run, step, stopped_early, last_eval)


def _prepare(config, workdir: str) -> _Run:
  """Fail fast: everything the config names is checked before the model is built. Saves
  the config, whose tokenizer points at a copy in the workdir."""
  is_main = jax.process_index() == 0
  workdir_lib.make(workdir)
  if is_main:
    workdir_lib.check_writable(workdir)
  mesh = sharding.mesh_from_config(config.mesh)
  rules = sharding.rules_from_config(config)
  sharding.check_global_batch(config.batch_size, mesh)
  _check_inputs(config)
  train_iter = pipeline.make_train_iterator(config.data, global_batch=config.batch_size,
                                            seed=config.seed)
  tokenizer = vocab.get_tokenizer(config.data)
  if tokenizer.vocab_size > config.model.text.vocab_size:
    raise config_lib.ConfigError(
        f"the tokenizer has {tokenizer.vocab_size} ids but config.model.text.vocab_size="
        f"{config.model.text.vocab_size}; set it to {tokenizer.vocab_size}")
  if is_main:  # the tokenizer travels with the workdir: config.json points at its copy
    saved = config.copy_and_resolve_references()
    with saved.data.tokenizer.ignore_type():
      saved.data.tokenizer.path = tokenizer_lib.copy_to_workdir(
          vocab.get_tokenizer(config.data), workdir)
    config_lib.save_config(saved, os.path.join(workdir, "config.json"))
  return _Run(config=config, workdir=workdir, mesh=mesh, rules=rules, is_main=is_main,
              train_iter=train_iter, tokenizer=tokenizer)


def _restore_or_init(run: _Run):
  """Builds the state, checkpointer, metrics writer and loss monitor; resumes from the
  latest checkpoint (or initialises from ``config.init_from``). Returns the step function."""
  config, is_main = run.config, run.is_main
  state, run.model, tx, schedule = create_train_state(config, run.mesh, run.rules)
  state_sh = sharding.shardings_of(state)
  ccfg = config.checkpoint
  run.ckpt = ckpt = checkpoint.Checkpointer(
      os.path.join(run.workdir, "checkpoints"), save_every=ccfg.save_every, keep=ccfg.keep,
      best_metric=ccfg.get("best_metric", None) or None, best_mode=ccfg.get("best_mode", "max"),
      async_save=ccfg.get("async_save", True), on_save_error=ccfg.get("on_save_error", "stop"))
  ckpt.state_bytes = checkpoint.tree_nbytes(state)
  if is_main:  # room for two checkpoints (the keep policy never holds fewer)
    workdir_lib.check_free_space(ckpt.directory, 2 * ckpt.state_bytes,
                                 "two checkpoints of this run")
  run.writer = metrics_lib.MetricWriter(run.workdir, enabled=is_main)
  start = 0
  if ckpt.all_steps():
    abstract = abstract_train_state(config, run.mesh, run.rules, run.model)
    start, state = ckpt.restore(abstract, iterator=run.train_iter)
    if is_main:
      _log.info("resumed from step %d", start)
  elif config.get("init_from", ""):
    state, n = init_params_from(state, config.init_from, config.get("init_keys", ""))
    if is_main:
      _log.info("initialised %d parameter arrays from %s", n, config.init_from)
  run.writer.truncate_after(start)  # rows a crashed or diverged run logged past `start`
  history = [r["loss"] for r in metrics_lib.read_jsonl(run.writer.path)
             if "loss" in r and r.get("step", 0) <= start] if jax.process_count() == 1 and start else []
  run.monitor = LossMonitor(float(ccfg.get("spike_factor", 10.0)), start=start, history=history)
  run.state, run.start = state, start
  # JAX's preemption sync point is 1 + the last step any process reported: report the
  # start now, so a SIGTERM during the first (compiling) step of a resumed run still stops.
  ckpt.reached_preemption(start)
  return make_train_step(run.model, tx, schedule, config, run.mesh, run.rules,
                         state_shardings=state_sh)


def _log_row(run: _Run, step: int, metrics, progress) -> dict:
  """The metrics row of a log step (fetched, checked for divergence, with throughput)."""
  config, total = run.config, int(run.config.total_steps)
  host = jax.device_get(metrics)
  _finite_or_raise(float(host["loss"]), step, run.monitor)
  now = time.perf_counter()
  row = {k: float(v) for k, v in host.items()}
  row["examples_per_sec"] = run.steps_since * config.batch_size / (now - run.t_last)
  row.update(throughput_fields(config, run.mesh, run.steps_since, now - run.t_last))
  run.t_last, run.steps_since = now, 0
  progress.update(0, loss=row["loss"])
  if run.is_main and progress.bar is None:  # no bar (off, or not a terminal): a log line
    _log.info("step %d/%d loss %.4f i2t_acc %.3f lr %.2e %.1f ex/s, ETA %s", step, total,
              row["loss"], row["i2t_acc"], row["lr"], row["examples_per_sec"],
              metrics_lib.eta(step - run.start, total - run.start, now - run.t_start))
  return row


def _loop(run: _Run, step_fn, stop_at: int | None):
  """Steps ``run.start + 1 .. total``. Returns ``(last step, stopped early, interrupted,
  last evaluation or None)``."""
  config, ckpt, start = run.config, run.ckpt, run.start
  total, log_every = int(config.total_steps), int(config.log_every)
  eval_every = int(config.get("eval_every", 0) or 0)
  # A bar on a terminal; otherwise the step lines (with ETA) and one closing line.
  progress = metrics_lib.Progress(total, start,
                                  enabled=run.is_main and config.get("progress", True),
                                  every_s=float("inf"))
  run.t_last = run.t_start = time.perf_counter()
  last_eval, step, stopped_early, interrupted = None, start, False, False
  try:
    with interrupt.StopRequest("pretraining") as stop_request:
      for step in range(start + 1, total + 1):
        batch = next(run.train_iter)
        gbatch = sharding.host_to_global(
            {"image": batch["image"], "tokens": batch["tokens"]}, run.mesh, config.batch_size)
        run.state, metrics = step_fn(run.state, gbatch)
        run.steps_since += 1
        progress.update(1)
        row = _log_row(run, step, metrics, progress) if (
            step % log_every == 0 or step == total) else None
        eval_metrics = None
        if eval_every and (step % eval_every == 0 or step == total):
          last_eval = run.evaluate()
          eval_metrics = metrics_lib.flatten_eval(last_eval)
          row = (row or {}) | eval_metrics
          run.t_last = time.perf_counter()  # evaluation time is not training throughput
        if row is not None:
          run.writer.write(step, row)
        end = loop_lib.step_end(ckpt, step, total, stop_request, stop_at)
        interrupted = end.interrupted
        if end.save:
          # Never save while the loss spikes: the checkpoint would be kept as "good".
          _finite_or_raise(float(jax.device_get(metrics["loss"])), step, run.monitor)
          ckpt.save(step, run.state, run.train_iter, config, metrics=eval_metrics, force=True)
        if end.stop:
          stopped_early = True
          if run.is_main:
            loop_lib.log_stop("pretraining", step, end)
          break
  except TrainingDiverged as e:
    progress.close()
    raise _diverged(e, ckpt, run.monitor, float(config.optim.lr)) from None
  finally:
    ckpt.wait()
    progress.close()
  return step, stopped_early, interrupted, last_eval


def _finish(run: _Run, step: int, stopped_early: bool, last_eval: dict | None) -> dict:
  """The summary; on a completed run also the final evaluation, summary.json and plots."""
  config, workdir = run.config, run.workdir
  wall = time.perf_counter() - run.t_start
  summary = {"steps": int(step), "stopped_early": stopped_early}
  if not stopped_early:
    if last_eval is None:
      last_eval = run.evaluate()
    summary.update(last_eval)
    summary["wall_time_s"] = wall
    summary["resumed_from"] = run.start
    if run.is_main:
      with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
      metrics_lib.plot_report(os.path.join(workdir, "metrics.jsonl"),
                              os.path.join(workdir, "report.png"),
                              title=f"{config.get('name', '')} ({config.loss})")
  run.ckpt.close()
  run.writer.close()
  return summary
