"""The shared training loop (`fszjax.loop.TrainLoop`) on a toy state and step, no model:
exact resume after a stop, NaN and loss spikes (suspect checkpoints set aside, the message
names the step a rerun resumes from), Ctrl-C (save, then `KeyboardInterrupt`, then
resume), and evaluation metrics in the rows and the best-checkpoint tracking."""

import glob
import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fszjax import checkpoint, loop

TOTAL = 8


def _ccfg(**kw):
  """A ``config.checkpoint`` section: every step saved and kept, synchronously."""
  c = dict(save_every=1, keep=100, async_save=False, on_save_error="stop", spike_factor=10.0,
           best_metric="", best_mode="max")
  return ml_collections.ConfigDict({**c, **kw})


def _make_step(bad=None, sigint_at=None):
  """A deterministic toy step; ``bad = {step: "nan" | "spike"}`` spoils that step's loss."""
  bad = bad or {}

  def step(state, i):
    if i == sigint_at:
      os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C arrived during this step
    w = state["w"] * 0.9 + 0.01 * i
    loss = jnp.sum(w ** 2) + 1.0
    if bad.get(i) == "nan":
      loss = loss * jnp.nan
    elif bad.get(i) == "spike":
      loss = loss * 100.0
    return {"w": w}, {"loss": loss, "w0": w[0]}

  return step


def _log_row(s: loop.LogStep):
  return dict(s.host), f"toy step {s.step}/{s.total} loss {s.host['loss']:.4f}"


def _train(wd, step_fn, *, stop_at=None, hint=None, ccfg=None, evaluate=None, eval_every=0):
  """One run (or rerun) of the loop in `wd`: ``(start, outcome)``."""
  tl = loop.TrainLoop("toy training", os.path.join(wd, "checkpoints"), wd, ccfg or _ccfg(),
                      hint or loop.LrHint(0.1), progress=False)
  start, state = tl.restore({"w": jnp.ones(4, jnp.float32)},
                            lambda: {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
  out = tl.run(state, loop.Job(step=step_fn, log_row=_log_row, total=TOTAL, log_every=1,
                               stop_at=stop_at, evaluate=evaluate, eval_every=eval_every))
  return start, out


def _rows(wd):
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _steps(wd):
  return checkpoint.Checkpointer(os.path.join(wd, "checkpoints"), read_only=True).all_steps()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted run: its final state and its metrics rows."""
  wd = str(tmp_path_factory.mktemp("straight"))
  start, out = _train(wd, _make_step())
  assert start == 0 and not out.stopped and out.step == TOTAL
  return np.asarray(out.state["w"]), _rows(wd)


def test_stop_at_then_resume_equals_an_uninterrupted_run(straight, tmp_path):
  wd = str(tmp_path)
  _, out = _train(wd, _make_step(), stop_at=3)
  assert out.stopped and out.step == 3 and out.end.reason == "stop_at"
  assert _steps(wd) == [1, 2, 3]
  start, out = _train(wd, _make_step())
  assert start == 3 and not out.stopped
  np.testing.assert_array_equal(np.asarray(out.state["w"]), straight[0])
  assert _rows(wd) == straight[1]


@pytest.mark.parametrize("kind", ["nan", "spike"])
def test_divergence_sets_suspect_checkpoints_aside_and_rerun_resumes(straight, tmp_path, kind):
  """The loss of step 6 is computed with checkpoint 5, so 5 is set aside; 1-4 stay."""
  wd = str(tmp_path)
  hint = loop.LrHint(1e-3, lr_key="fewshot.meta.outer_lr", warmup_key=None)
  with pytest.raises(loop.TrainingDiverged, match=r"at step 6\b.* training diverged; .* "
                     r"moved aside .* resumes from step 4 .* --config.fewshot.meta.outer_lr "
                     r"\(e.g. 0.0001\) takes effect") as e:
    _train(wd, _make_step(bad={6: kind}), hint=hint)
  assert e.value.step == 6 and "warmup" not in str(e.value)
  assert _steps(wd) == [1, 2, 3, 4]
  aside = glob.glob(os.path.join(wd, "checkpoints", "5.diverged-*"))
  assert len(aside) == 1 and os.path.isdir(aside[0])  # set aside, not deleted
  assert max(r["step"] for r in _rows(wd)) == 5  # the spoiled step is not logged
  # The rerun (with the cause fixed) resumes from 4 and repeats the uninterrupted run.
  start, out = _train(wd, _make_step())
  assert start == 4 and not out.stopped
  np.testing.assert_array_equal(np.asarray(out.state["w"]), straight[0])
  assert _rows(wd) == straight[1]


def test_divergence_before_any_good_checkpoint_starts_over(tmp_path):
  with pytest.raises(loop.TrainingDiverged, match=r"loss is nan at step 2: .* moved aside .* "
                     r"starts over from step 0: lower --config.optim.lr \(e.g. 0.01\) or raise "
                     r"--config.optim.warmup_steps"):
    _train(str(tmp_path), _make_step(bad={2: "nan"}))
  assert _steps(str(tmp_path)) == []


def test_ctrl_c_saves_the_step_then_raises_and_the_rerun_resumes(straight, tmp_path):
  wd = str(tmp_path)
  before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a pytest-xdist worker
  with pytest.raises(KeyboardInterrupt):
    _train(wd, _make_step(sigint_at=3), ccfg=_ccfg(save_every=100))
  assert max(_steps(wd)) == 3  # saved where it stopped, off the save schedule
  assert signal.getsignal(signal.SIGINT) is before  # the caller's handler restored
  start, out = _train(wd, _make_step())
  assert start == 3 and not out.stopped
  np.testing.assert_array_equal(np.asarray(out.state["w"]), straight[0])
  assert _rows(wd) == straight[1]


def test_evaluation_goes_into_rows_and_best_checkpoint(tmp_path):
  wd = str(tmp_path)
  seen = []

  def evaluate(state, step):
    seen.append(step)
    return {"eval/score": -abs(step - 4)}  # best at step 4

  ccfg = _ccfg(best_metric="eval/score", best_mode="max", keep=2)
  _train(wd, _make_step(), ccfg=ccfg, evaluate=evaluate, eval_every=4)
  assert seen == [4, 8]
  rows = {r["step"]: r for r in _rows(wd)}
  assert rows[4]["eval/score"] == 0 and "eval/score" not in rows[3] and "loss" in rows[4]
  assert _steps(wd) == [4, 7, 8]  # the best (4) and the latest two kept, the rest rotated out


def test_each_step_loss_is_checked_once(tmp_path, monkeypatch):
  """A step that is logged and saved feeds its loss to the divergence monitor once, so
  the median of recent losses is not weighted towards save steps; unlogged save steps are
  still checked before saving."""
  seen = []
  real = loop.LossMonitor.check
  monkeypatch.setattr(loop.LossMonitor, "check",
                      lambda self, loss, step: (seen.append(step), real(self, loss, step)))
  _train(str(tmp_path / "a"), _make_step())  # log_every=1, save_every=1
  assert seen == list(range(1, TOTAL + 1))
  seen.clear()
  tl = loop.TrainLoop("toy training", str(tmp_path / "b" / "checkpoints"), str(tmp_path / "b"),
                      _ccfg(save_every=3), loop.LrHint(0.1), progress=False)
  _, state = tl.restore({"w": jnp.ones(4, jnp.float32)},
                        lambda: {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
  tl.run(state, loop.Job(step=_make_step(), log_row=_log_row, total=TOTAL, log_every=4))
  saved = _steps(str(tmp_path / "b"))
  assert {3, 6, 8} <= set(saved) and 4 not in saved
  assert seen == sorted(set(saved) | {4, 8})  # each logged or saved step once
