"""Ctrl-C that keeps the work: the first SIGINT asks a training loop to save and stop at
the end of the current step; a second one interrupts at once.

The shared training loop (`fszjax.loop.TrainLoop`, which runs `fszjax.pretrain.train` and
`fszjax.fewshot.meta_loop.meta_train`) polls `StopRequest.requested` at every step
boundary, saves a checkpoint there (the state and the data iterator agree: no batch is
skipped or repeated) and raises `KeyboardInterrupt`, which the CLI turns into exit status
130, so a calling shell script (`launch/local.sh`) stops too.
Rerunning the same command resumes from that step.

Only in a single-process job and from the main thread: in a multi-process job the
processes must agree on the step they stop at, which is what JAX's preemption sync point
does for SIGTERM (`fszjax.multihost`); there Ctrl-C keeps Python's default behaviour.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

log = logging.getLogger("fszjax")


class StopRequest:
  """Context manager: while active, the first SIGINT sets `requested`."""

  def __init__(self, what: str = "training"):
    self.what = what
    self.requested = False
    self._previous = None
    self._installed = False

  def _handler(self, signum, frame):
    del signum, frame
    if self.requested:  # second Ctrl-C: stop now, without saving
      signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
      raise KeyboardInterrupt
    self.requested = True
    log.warning("Ctrl-C: %s saves a checkpoint at the end of this step and stops (rerun the "
                "same command to resume); press Ctrl-C again to stop without saving", self.what)

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGINT, self._handler)
      self._installed = True
    return self

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
      self._installed = False
