"""The step boundary shared by the training loops (`fszjax.pretrain` and
`fszjax.fewshot.meta_loop`): after each step, whether to save a checkpoint and whether to
stop (preemption, Ctrl-C, or a requested last step), and the one warning a stop logs."""

from __future__ import annotations

import dataclasses
import logging

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
