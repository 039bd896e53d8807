"""The one training loop of pretraining (`fszjax.pretrain`) and meta-training
(`fszjax.fewshot.meta_loop`): checkpoints (`checkpoint.Checkpointer` from a
``config.checkpoint`` section), resume, JAX's preemption sync, Ctrl-C
(`interrupt.StopRequest`), NaN and loss-spike handling, the metrics file and the progress /
ETA log lines, written once.

A job supplies a `Job`: the step (``(state, step) -> (state, metrics)``, the metrics on
the device with a ``"loss"``), how a logged step becomes a metrics row and a log line, an
optional periodic evaluation, and what `Checkpointer.save` stores besides the state. The
state and the data agree at every saved step (batches are drawn by step index or from an
iterator saved with the state), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from typing import Any, Callable

import jax

from fszjax import checkpoint, interrupt
from fszjax import metrics as metrics_lib
from fszjax import workdir as workdir_lib
from fszjax.errors import UserError

log = logging.getLogger("fszjax")


@dataclasses.dataclass(frozen=True)
class StepEnd:
  """What the loop does after a step: ``save`` a checkpoint now; ``stop`` after it, for
  ``reason`` ('preemption', 'Ctrl-C' or 'stop_at')."""
  save: bool
  stop: bool
  preempted: bool
  interrupted: bool

  @property
  def reason(self) -> str:
    return "preemption" if self.preempted else "Ctrl-C" if self.interrupted else "stop_at"


def step_end(ckpt, step: int, total: int, stop_request, stop_at: int | None = None) -> StepEnd:
  """The decision after `step` of `total`: `ckpt` (a `checkpoint.Checkpointer`) reports the
  step to JAX's preemption sync and says whether its schedule saves; `stop_request` (an
  `interrupt.StopRequest`) says whether Ctrl-C / SIGTERM asked to stop. The last step, and
  any stop, always save."""
  preempted = ckpt.reached_preemption(step)
  interrupted = stop_request.requested
  stop = preempted or interrupted or (stop_at is not None and step >= stop_at)
  save = ckpt.should_save(step) or step == total or stop
  return StepEnd(save=save, stop=stop, preempted=preempted, interrupted=interrupted)


def log_stop(what: str, step: int, end: StepEnd) -> None:
  """The one line a stopped run logs (process 0 only is the caller's choice)."""
  log.warning("stopping %s at step %d (%s); rerun the same command to resume", what, step,
              end.reason)


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


@dataclasses.dataclass(frozen=True)
class LrHint:
  """The config keys a diverged run's message tells the user to change (without the
  ``config.`` prefix), and the current learning rate (the message suggests a tenth)."""
  lr: float
  lr_key: str = "optim.lr"
  warmup_key: str | None = "optim.warmup_steps"


def diverged(e: TrainingDiverged, ckpt, last_ok: int, hint: LrHint) -> TrainingDiverged:
  """Moves the checkpoints from step `last_ok` on aside and says how to continue."""
  ckpt.wait()
  suspect = [s for s in ckpt.all_steps() if s >= last_ok]
  moved = ckpt.set_aside(suspect, "diverged") if suspect else []
  good = ckpt.latest_step()
  aside = (f"checkpoint step(s) {suspect} (written after the last good loss, step "
           f"{last_ok}) moved aside to {moved[0]}{' ...' if len(moved) > 1 else ''}; "
           if moved else "")
  lr = f"--config.{hint.lr_key} (e.g. {hint.lr / 10:g})"
  if good is not None:
    warmup = f" or a longer --config.{hint.warmup_key}" if hint.warmup_key else ""
    how = (f"rerunning the same command resumes from step {good} (the last checkpoint from "
           f"before the blow-up), and a changed {lr}{warmup} takes effect from there; or pass "
           "--fresh to start over")
  else:
    warmup = f" or raise --config.{hint.warmup_key}" if hint.warmup_key else ""
    how = f"no checkpoint predates the blow-up, so rerunning starts over from step 0: lower {lr}{warmup}"
  return TrainingDiverged(f"{e}: training diverged; {aside}{how}", e.loss, e.step)


def make_checkpointer(directory: str, ccfg) -> checkpoint.Checkpointer:
  """The `Checkpointer` of a ``config.checkpoint`` section (``save_every``, ``keep``,
  ``best_metric`` ("" = no best-checkpoint tracking), ``best_mode``, ``async_save``,
  ``on_save_error``; every key in `fszjax.config_defaults`, pretraining and adapt)."""
  return checkpoint.Checkpointer(
      directory, save_every=int(ccfg.save_every), keep=int(ccfg.keep),
      best_metric=ccfg.best_metric or None, best_mode=ccfg.best_mode,
      async_save=ccfg.async_save, on_save_error=ccfg.on_save_error)


@dataclasses.dataclass(frozen=True)
class LogStep:
  """A logged step, fetched and checked: ``host`` its metrics as floats; ``steps`` and
  ``seconds`` since the previous log step (evaluation time not counted); ``done`` steps
  in ``elapsed`` seconds since the loop started."""
  step: int
  total: int
  host: dict
  steps: int
  seconds: float
  done: int
  elapsed: float


@dataclasses.dataclass
class Job:
  """What a training job runs: ``step(state, step) -> (state, metrics)`` for steps
  ``start + 1 .. total``; ``log_row(LogStep) -> (row, line)`` the metrics row and the log
  line (the loop adds the ETA) of every ``log_every``-th and the last step; ``evaluate(
  state, step) -> flat metrics`` every ``eval_every``-th and the last step (into the row,
  and into the checkpoint's metrics for best-checkpoint tracking); ``save_items``: what
  `Checkpointer.save` stores besides the state (``iterator``, ``config``); ``stop_at``: stop
  after that step as if preempted."""
  step: Callable[[Any, int], tuple[Any, Any]]
  log_row: Callable[[LogStep], tuple[dict, str]]
  total: int
  log_every: int
  evaluate: Callable[[Any, int], dict] | None = None
  eval_every: int = 0
  save_items: dict = dataclasses.field(default_factory=dict)
  stop_at: int | None = None


@dataclasses.dataclass
class Outcome:
  """The end of `TrainLoop.run`: the state after ``step``; ``end`` says why it stopped
  early (preemption or ``stop_at``), None when it ran to the last step."""
  state: Any
  step: int
  end: StepEnd | None

  @property
  def stopped(self) -> bool:
    return self.end is not None


class TrainLoop:
  """The loop of one training job. ``name`` ("pretraining", "meta-training") is in its
  messages; checkpoints go to `ckpt_dir`, ``metrics.jsonl`` and TensorBoard files to
  `metrics_dir` (process 0). Use: `restore`, then `run`."""

  def __init__(self, name: str, ckpt_dir: str, metrics_dir: str, ccfg, hint: LrHint, *,
               progress: bool = True, desc: str = "pretrain"):
    self.name, self.metrics_dir, self.hint = name, metrics_dir, hint
    self.is_main = jax.process_index() == 0
    self.ckpt = make_checkpointer(ckpt_dir, ccfg)
    self.spike_factor = float(ccfg.spike_factor)
    self.progress_enabled, self.desc = bool(progress), desc
    self.writer: metrics_lib.MetricWriter | None = None
    self.monitor = LossMonitor(self.spike_factor)
    self.start = 0
    self.t_start = self.t_last = time.perf_counter()
    self.steps_since = 0

  def restore(self, state, abstract: Callable[[], Any], iterator=None):
    """Checks the free space for two checkpoints of `state`, opens the metrics file and
    resumes from the latest checkpoint (``abstract()``: the abstract state to restore onto;
    `iterator` restored in place) or keeps `state`. Returns ``(start step, state)``."""
    ckpt = self.ckpt
    ckpt.state_bytes = checkpoint.tree_nbytes(state)
    if self.is_main:  # room for two checkpoints (the keep policy never holds fewer)
      workdir_lib.check_free_space(ckpt.directory, 2 * ckpt.state_bytes,
                                   "two checkpoints of this run")
    self.writer = metrics_lib.MetricWriter(self.metrics_dir, enabled=self.is_main)
    start = 0
    if ckpt.all_steps():
      start, state = ckpt.restore(abstract(), iterator=iterator)
      if self.is_main:
        log.info("resumed %s at step %d", self.name, start)
    self.writer.truncate_after(start)  # rows a crashed or diverged run logged past `start`
    # The losses logged up to `start` (metrics.jsonl rows, not a config: keys vary by row).
    history = [r["loss"] for r in metrics_lib.read_jsonl(self.writer.path)
               if "loss" in r and r.get("step", 0) <= start] if jax.process_count() == 1 and start else []
    self.monitor = LossMonitor(self.spike_factor, start=start, history=history)
    self.start = start
    # JAX's preemption sync point is 1 + the last step any process reported: report the
    # start now, so a SIGTERM during the first (compiling) step of a resumed run still stops.
    ckpt.reached_preemption(start)
    return start, state

  def run(self, state, job: Job) -> Outcome:
    """Steps ``start + 1 .. job.total``. Ctrl-C saves the step and raises
    `KeyboardInterrupt`; a NaN or spiking loss sets the suspect checkpoints aside and raises
    `TrainingDiverged`. Closes the checkpointer and the metrics file when it returns."""
    ckpt, start, total = self.ckpt, self.start, int(job.total)
    # A bar on a terminal; otherwise the step lines (with ETA) and one closing line.
    progress = metrics_lib.Progress(total, start, enabled=self.is_main and self.progress_enabled,
                                    desc=self.desc, every_s=float("inf"))
    self.t_last = self.t_start = time.perf_counter()
    self.steps_since = 0
    step, end = start, None
    try:
      with interrupt.StopRequest(self.name) as stop_request:
        for step in range(start + 1, total + 1):
          state, after = self._step(state, step, job, progress, stop_request)
          if after.stop:
            end = after
            if self.is_main:
              log_stop(self.name, step, end)
            break
    except TrainingDiverged as e:
      progress.close()
      raise diverged(e, ckpt, self.monitor.last_ok, self.hint) from None
    finally:
      ckpt.wait()
      progress.close()
    self.close()
    if end is not None and end.interrupted:
      raise KeyboardInterrupt
    return Outcome(state=state, step=step, end=end)

  def _step(self, state, step: int, job: Job, progress, stop_request):
    """One step and its boundary: log row, evaluation, save. Returns ``(state, StepEnd)``."""
    total = int(job.total)
    state, metrics = job.step(state, step)
    self.steps_since += 1
    progress.update(1)
    logged = step % int(job.log_every) == 0 or step == total
    row = self._log_row(step, metrics, job, progress) if logged else None
    eval_metrics = None
    if job.evaluate is not None and job.eval_every and (step % job.eval_every == 0
                                                        or step == total):
      eval_metrics = job.evaluate(state, step)
      row = (row or {}) | eval_metrics
      self.t_last = time.perf_counter()  # evaluation time is not training throughput
    if row is not None:
      self.writer.write(step, row)
    end = step_end(self.ckpt, step, total, stop_request, job.stop_at)
    if end.save:
      # Never save while the loss spikes: the checkpoint would be kept as "good". A logged
      # step's loss was fetched and checked already (once: the check records it).
      if not logged:
        self.monitor.check(float(jax.device_get(metrics["loss"])), step)
      self.ckpt.save(step, state, **job.save_items, metrics=eval_metrics, force=True)
    return state, end

  def _log_row(self, step: int, metrics, job: Job, progress) -> dict:
    """The metrics row of a log step (fetched, checked for divergence) and its log line."""
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    self.monitor.check(host["loss"], step)
    now = time.perf_counter()
    total = int(job.total)
    row, line = job.log_row(LogStep(step=step, total=total, host=host, steps=self.steps_since,
                                    seconds=now - self.t_last, done=step - self.start,
                                    elapsed=now - self.t_start))
    self.t_last, self.steps_since = now, 0
    progress.update(0, loss=row["loss"])
    if self.is_main and progress.bar is None:  # no bar (off, or not a terminal): a log line
      log.info("%s, ETA %s", line, metrics_lib.eta(step - self.start, total - self.start,
                                                   now - self.t_start))
    return row

  def close(self) -> None:
    """Waits for the last save and closes the checkpointer and the metrics file."""
    self.ckpt.close()
    if self.writer is not None:
      self.writer.close()
