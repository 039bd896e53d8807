"""Contrastive pretraining: the set-up, the step and the metrics of a run of the shared
training loop (`fszjax.loop`: checkpoint / resume, preemption, Ctrl-C, NaN and spike
handling, metrics and progress), periodic and final evaluation, and the summary.

The train state and optimizer live in `fszjax.train_state`, the jitted step in
`fszjax.train_step`, the divergence rule in `fszjax.loop`; their public names are
re-exported here for callers of `fszjax.pretrain`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
from jax.sharding import Mesh

from fszjax import checkpoint, evaluate, flops, sharding
from fszjax import loop as loop_lib
from fszjax import config as config_lib
from fszjax import metrics as metrics_lib
from fszjax import text as tokenizer_lib
from fszjax import workdir as workdir_lib
from fszjax.data import pipeline, sources, vocab
from fszjax.loop import LossMonitor, TrainingDiverged
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
  src = config.init_from
  if src:
    try:
      checkpoint.step_dirs(src)
    except checkpoint.CheckpointError as e:
      raise checkpoint.CheckpointError(f"config.init_from={src}: {e}") from None
  # The data section is free-form (fszjax/data/defaults.py, not filled at load): a saved
  # config's may lack eval_splits.
  splits = list(config.eval.splits) or list(config.data.get("eval_splits", ()) or ())
  if splits:  # the final evaluation always runs
    comp = sources.single_component(config.data)
    for split in splits:
      sources.open_split(comp, split)



@dataclasses.dataclass
class _Run:
  """What pretraining carries from set-up to the summary."""
  config: Any
  workdir: str
  mesh: Mesh
  rules: Any
  is_main: bool
  train_iter: Any
  tokenizer: Any
  model: Any = None
  state: Any = None
  loop: Any = None
  last_eval: dict | None = None
  eval_cache: dict = dataclasses.field(default_factory=dict)

  def evaluate(self, state) -> dict:
    with jax.set_mesh(self.mesh):
      with metrics_lib.timed(f"zero-shot evaluation at step {int(state.step)}", _log,
                             enabled=self.is_main):
        return evaluate.run_evaluators(self.config, self.model, state.params,
                                       self.tokenizer, arrays_cache=self.eval_cache)


_log = logging.getLogger("fszjax")


def _train(config, workdir: str, *, stop_at: int | None = None) -> dict:
  """`train` with the workdir lock held."""
  run = _prepare(config, workdir)
  train_step = _restore_or_init(run)
  out = run.loop.run(run.state, _job(run, train_step, stop_at))
  run.state = out.state
  return _finish(run, out.step, out.stopped)


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
      saved.data.tokenizer.path = tokenizer_lib.copy_to_workdir(tokenizer, workdir)
    config_lib.save_config(saved, os.path.join(workdir, "config.json"))
  return _Run(config=config, workdir=workdir, mesh=mesh, rules=rules, is_main=is_main,
              train_iter=train_iter, tokenizer=tokenizer)


def _restore_or_init(run: _Run):
  """Builds the state and the training loop (checkpointer, metrics, loss monitor); resumes
  from the latest checkpoint (or initialises from ``config.init_from``). Returns the
  jitted step function."""
  config = run.config
  state, run.model, tx, schedule = create_train_state(config, run.mesh, run.rules)
  state_sh = sharding.shardings_of(state)
  run.loop = loop_lib.TrainLoop(
      "pretraining", os.path.join(run.workdir, "checkpoints"), run.workdir, config.checkpoint,
      loop_lib.LrHint(float(config.optim.lr)), progress=config.progress)
  start, state = run.loop.restore(
      state, lambda: abstract_train_state(config, run.mesh, run.rules, run.model),
      iterator=run.train_iter)
  if not start and config.init_from:
    state, n = init_params_from(state, config.init_from, config.init_keys)
    if run.is_main:
      _log.info("initialised %d parameter arrays from %s", n, config.init_from)
  run.state = state
  return make_train_step(run.model, tx, schedule, config, run.mesh, run.rules,
                         state_shardings=state_sh)


def _job(run: _Run, train_step, stop_at: int | None) -> loop_lib.Job:
  """Pretraining as a `loop.Job`: a step on the next global batch; rows with loss,
  i2t_acc, lr, examples/s and model TFLOP/s; zero-shot evaluation every ``eval_every``
  steps; checkpoints with the data iterator and the config."""
  config = run.config

  def step(state, _):
    batch = next(run.train_iter)
    gbatch = sharding.host_to_global(
        {"image": batch["image"], "tokens": batch["tokens"]}, run.mesh, config.batch_size)
    return train_step(state, gbatch)

  def log_row(s: loop_lib.LogStep):
    row = dict(s.host)
    row["examples_per_sec"] = s.steps * config.batch_size / s.seconds
    row.update(throughput_fields(config, run.mesh, s.steps, s.seconds))
    line = "step %d/%d loss %.4f i2t_acc %.3f lr %.2e %.1f ex/s" % (
        s.step, s.total, row["loss"], row["i2t_acc"], row["lr"], row["examples_per_sec"])
    return row, line

  def evaluate_(state, _):
    run.last_eval = run.evaluate(state)
    return metrics_lib.flatten_eval(run.last_eval)

  return loop_lib.Job(step=step, log_row=log_row, total=int(config.total_steps),
                      log_every=int(config.log_every), evaluate=evaluate_,
                      eval_every=int(config.eval_every or 0),
                      save_items={"iterator": run.train_iter, "config": config}, stop_at=stop_at)


def _finish(run: _Run, step: int, stopped_early: bool) -> dict:
  """The summary; on a completed run also the final evaluation, summary.json and plots."""
  config, workdir = run.config, run.workdir
  wall = time.perf_counter() - run.loop.t_start
  summary = {"steps": int(step), "stopped_early": stopped_early}
  if not stopped_early:
    last_eval = run.last_eval if run.last_eval is not None else run.evaluate(run.state)
    summary.update(last_eval)
    summary["wall_time_s"] = wall
    summary["resumed_from"] = run.loop.start
    if run.is_main:
      with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
      metrics_lib.plot_report(os.path.join(workdir, "metrics.jsonl"),
                              os.path.join(workdir, "report.png"),
                              title=f"{config.name} ({config.loss})")
  return summary
