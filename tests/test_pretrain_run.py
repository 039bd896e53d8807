"""`fszjax pretrain` / `fszjax eval`: exact resume after SIGKILL, restore onto other meshes,
evaluators on hand-built cases, and one-line errors for bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import data_testlib
from fszjax import checkpoint, config as config_lib, evaluate, pretrain, sharding, train_cli
from helpers import max_abs_diff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def gdir(tmp_path_factory):
  return data_testlib.glyphs_data_dir(tmp_path_factory)


def run_overrides(gdir, *extra):
  return [
      f"--config.data.data_dir={gdir}", f"--config.data.glyphs.max_chars={data_testlib.GLYPH_MAX_CHARS}",
      "--config.data.tokenizer.vocab_size=256", "--config.data.num_threads=1",
      "--config.model.text.vocab_size=256",
      "--config.batch_size=16", "--config.model.embed_dim=16",
      "--config.model.image.width=32", "--config.model.image.depth=1",
      "--config.model.image.mlp_dim=64", "--config.model.image.num_heads=2",
      "--config.model.image.patch_size=8",
      "--config.model.text.width=32", "--config.model.text.depth=1",
      "--config.model.text.mlp_dim=64", "--config.model.text.num_heads=2",
      "--config.optim.warmup_steps=2", "--config.optim.lr=0.003", "--config.optim.eps=1e-3",
      "--config.total_steps=12", "--config.log_every=1", "--config.eval_every=0",
      "--config.checkpoint.save_every=4", "--config.checkpoint.keep=5",
      "--config.checkpoint.best_metric=", "--config.eval.max_examples=64",
      "--config.progress=False",
  ] + list(extra)


def load_cfg(gdir, *extra):
  return config_lib.load_config(os.path.join(ROOT, "configs/glyphs.py"), run_overrides(gdir, *extra))


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _cli(args, env_extra=None):
  # Same numerics as this process (conftest.py sets the matmul precision).
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
             JAX_DEFAULT_MATMUL_PRECISION="highest")
  env.update(env_extra or {})
  return [sys.executable, "-m", "fszjax.cli", "--cpu_devices", "8"] + args, env


@pytest.fixture(scope="module")
def reference_run(gdir, tmp_path_factory):
  """An uninterrupted run on a data x fsdp = 2 x 4 mesh."""
  wd = str(tmp_path_factory.mktemp("ref"))
  cfg = load_cfg(gdir, "--config.mesh.data=2", "--config.mesh.fsdp=4")
  summary = pretrain.train(cfg, wd)
  return wd, summary


def test_exact_resume_after_sigkill(gdir, reference_run, tmp_path):
  ref_wd, ref_summary = reference_run
  wd = str(tmp_path / "killed")
  args = ["pretrain", "--config", os.path.join(ROOT, "configs/glyphs.py"), "--workdir", wd]
  args += run_overrides(gdir, "--config.mesh.data=2", "--config.mesh.fsdp=4",
                        "--config.checkpoint.async_save=False")
  cmd, env = _cli(args)
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 240
  marker = os.path.join(wd, "checkpoints", "4")
  try:
    while time.time() < deadline and proc.poll() is None:
      if os.path.isdir(marker) and os.path.exists(os.path.join(marker, "commit_success.txt")):
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.05)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
  steps_at_kill = checkpoint.Checkpointer(os.path.join(wd, "checkpoints"), read_only=True).all_steps()
  assert steps_at_kill and max(steps_at_kill) < 12
  # Restart (in this process) and finish.
  cfg = load_cfg(gdir, "--config.mesh.data=2", "--config.mesh.fsdp=4")
  summary = pretrain.train(cfg, wd)
  assert summary["resumed_from"] == max(steps_at_kill) > 0
  p_ref = checkpoint.load_params_numpy(ref_wd)
  p_new = checkpoint.load_params_numpy(wd)
  assert max_abs_diff(p_ref, p_new) == 0.0  # bitwise on CPU
  assert _losses(wd) == _losses(ref_wd)
  assert summary["zeroshot"] == ref_summary["zeroshot"]


def test_ctrl_c_saves_the_current_step_and_rerun_resumes(gdir, tmp_path):
  """First Ctrl-C (SIGINT): checkpoint at the step it stopped at (no logged step lost),
  exit status 130; rerunning the same command resumes there."""
  wd = str(tmp_path / "ctrlc")
  extra = ["--config.checkpoint.save_every=1000", "--config.checkpoint.async_save=False"]
  args = ["pretrain", "--config", os.path.join(ROOT, "configs/glyphs.py"), "--workdir", wd]
  cmd, env = _cli(args + run_overrides(gdir, "--config.total_steps=1000", *extra))
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  metrics = os.path.join(wd, "metrics.jsonl")
  deadline = time.time() + 240
  try:
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:
        proc.send_signal(signal.SIGINT)
        break
      time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  err = err.decode()
  assert proc.returncode == 130, err[-2000:]
  assert "Ctrl-C" in err and "interrupted" in err
  steps = checkpoint.Checkpointer(os.path.join(wd, "checkpoints"), read_only=True).all_steps()
  logged = max(_losses(wd))
  assert max(steps) == logged and 3 <= logged < 1000  # saved exactly where it stopped
  cfg = load_cfg(gdir, f"--config.total_steps={logged + 2}", *extra)
  summary = pretrain.train(cfg, wd)
  assert summary["resumed_from"] == logged and summary["steps"] == logged + 2


@pytest.mark.parametrize("mesh", ["4,2", "1,8", "single"])
def test_restore_onto_other_meshes(reference_run, gdir, mesh):
  wd, summary = reference_run
  overrides = [(k[len("--config."):].split("=", 1)[0], k.split("=", 1)[1])
               for k in run_overrides(gdir) if k.startswith("--config.data")]
  devices = None
  if mesh == "single":
    devices = jax.devices()[:1]
  else:
    d, f = mesh.split(",")
    overrides += [("mesh.data", d), ("mesh.fsdp", f)]
  out = os.path.join(wd, f"eval_{mesh.replace(',', 'x')}.json")
  result = train_cli.evaluate_checkpoint(wd, None, overrides, devices=devices, out_path=out)
  assert result["steps"] == 12
  for split in summary["zeroshot"]:
    for k in ("top1", "top5"):
      assert result["zeroshot"][split][k] == pytest.approx(summary["zeroshot"][split][k], abs=1e-9)
  assert json.load(open(out))["steps"] == 12


def test_restored_params_identical_on_one_device(reference_run, gdir):
  wd, _ = reference_run
  cfg = config_lib.load_config(os.path.join(wd, "config.json"))
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  abstract = pretrain.abstract_train_state(cfg, mesh, sharding.rules_from_config(cfg))
  ck = checkpoint.Checkpointer(os.path.join(wd, "checkpoints"), read_only=True)
  step, state = ck.restore(abstract)
  assert step == 12
  assert max_abs_diff(jax.tree.map(np.asarray, state.params), checkpoint.load_params_numpy(wd)) == 0.0
  assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(state.params))


def test_fsdp8_checkpoint_restores_on_one_device(gdir, tmp_path):
  wd = str(tmp_path / "fsdp8")
  cfg = load_cfg(gdir, "--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.total_steps=2")
  pretrain.train(cfg, wd)
  mesh1 = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  ck = checkpoint.Checkpointer(os.path.join(wd, "checkpoints"), read_only=True)
  _, state = ck.restore(pretrain.abstract_train_state(cfg, mesh1, sharding.DEFAULT_RULES))
  saved = checkpoint.load_params_numpy(wd)
  assert max_abs_diff(jax.tree.map(np.asarray, state.params), saved) == 0.0


def test_corrupt_latest_checkpoint_falls_back(reference_run, tmp_path):
  import shutil

  src, _ = reference_run
  wd = str(tmp_path / "corrupt")
  shutil.copytree(src, wd)
  latest = os.path.join(wd, "checkpoints", "12", "state")
  # Truncate every data file of the latest state item.
  for root, _, files in os.walk(latest):
    for f in files:
      if not f.startswith("_"):
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  cfg = config_lib.load_config(os.path.join(wd, "config.json"))
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  ck = checkpoint.Checkpointer(os.path.join(wd, "checkpoints"), read_only=True)
  step, _ = ck.restore(pretrain.abstract_train_state(cfg, mesh, sharding.DEFAULT_RULES))
  assert step == 8


# ------------------------------------------------------------------ evaluators, hand-built


def test_zero_shot_hand_built():
  # 3 classes along the axes; two templates per class whose embeddings average to the axis.
  emb = {"a x": [1, .2, 0], "b x": [1, -.2, 0], "a y": [.2, 1, 0], "b y": [-.2, 1, 0],
         "a z": [0, .2, 1], "b z": [0, -.2, 1]}
  enc = lambda texts: np.asarray([emb[t] for t in texts], np.float32)
  clf = evaluate.zero_shot_classifier(enc, ["x", "y", "z"], ["a {}", "b {}"])
  np.testing.assert_allclose(clf, np.eye(3), atol=1e-6)
  zimg = np.asarray([[.9, .1, 0], [0, 1, .3], [.1, 0, 1], [1, .9, 0]], np.float32)
  labels = np.asarray([0, 1, 2, 1])
  m = evaluate.topk_accuracy(zimg, clf, labels, ks=(1, 2))
  assert m["top1"] == 0.75 and m["top2"] == 1.0
  assert m["num_classes"] == 3 and m["chance"] == pytest.approx(1 / 3)
  # Free-text descriptions per class.
  clf2 = evaluate.zero_shot_classifier(enc, [["a x", "b x"], ["a y"], ["b z"]], [])
  assert np.argmax(clf2 @ np.asarray([0, 1, 0.]), 0) == 1


def test_retrieval_hand_built():
  zimg = np.eye(3, dtype=np.float32)
  ztxt = np.asarray([[0, 1, 0], [1, 0, .1], [.9, 0, .5]], np.float32)  # text groups 1, 0, 2
  m = evaluate.retrieval_metrics(zimg, ztxt, np.asarray([0, 1, 2]), np.asarray([1, 0, 2]),
                                 ks=(1, 2))
  # image 0 -> best text 1 (group 0) hit; image 1 -> text 0 hit; image 2 -> text 2 hit.
  assert m["i2t_r1"] == 1.0
  # text 0 (g1) -> image 1 hit; text 1 (g0) -> image 0 hit; text 2 (g2) -> image 0 miss, r2 hit.
  assert m["t2i_r1"] == pytest.approx(2 / 3) and m["t2i_r2"] == 1.0


# ------------------------------------------------------------------ bad input


def test_config_typo_one_line_error():
  with pytest.raises(config_lib.ConfigError, match=r"did you mean config\.optim\.lr"):
    config_lib.load_config(os.path.join(ROOT, "configs/glyphs.py"), ["--config.optim.lrr=1"])
  cmd, env = _cli(["pretrain", "--config", "configs/glyphs.py", "--workdir", "/tmp/nowhere",
                   "--config.optim.lrr=1"])
  r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and "unknown config key config.optim.lrr" in lines[0]


def test_batch_not_divisible_and_missing_init_from(gdir, tmp_path):
  cfg = load_cfg(gdir, "--config.batch_size=12")  # 8 data-parallel devices
  with pytest.raises(sharding.ShardingError, match="not divisible by the data-parallel size 8"):
    pretrain.train(cfg, str(tmp_path / "a"))
  cfg = load_cfg(gdir, "--config.init_from=/does/not/exist")
  with pytest.raises(checkpoint.CheckpointError, match="init_from"):
    pretrain.train(cfg, str(tmp_path / "b"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(gdir, tmp_path):
  wd = str(tmp_path / "nan")
  cfg = load_cfg(gdir, "--config.optim.lr=1e30", "--config.optim.warmup_steps=0",
                 "--config.optim.clip_norm=0.0", "--config.checkpoint.save_every=1")
  # Step 1's update (lr 1e30) already ruined the params: step 2's loss spikes, checkpoint 1
  # is set aside (not deleted) and the message says the rerun starts over (test_faults.py
  # follows such a message to a finished run).
  with pytest.raises(pretrain.TrainingDiverged, match=r"at step 2\b.* training "
                     r"diverged; .* moved aside .* starts over from step 0"):
    pretrain.train(cfg, wd)
  steps = checkpoint.Checkpointer(os.path.join(wd, "checkpoints"), read_only=True).all_steps()
  assert not steps and os.listdir(os.path.join(wd, "checkpoints"))  # kept aside for inspection


def test_init_from_copies_image_tower(reference_run, gdir, tmp_path):
  src, _ = reference_run
  cfg = load_cfg(gdir, f"--config.init_from={src}", "--config.init_keys=^img/",
                 "--config.total_steps=1", "--config.optim.freeze=['^img/']")
  wd = str(tmp_path / "lit")
  pretrain.train(cfg, wd)
  a, b = checkpoint.load_params_numpy(src), checkpoint.load_params_numpy(wd)
  assert max_abs_diff(a["img"], b["img"]) == 0.0  # copied and frozen
  assert max_abs_diff(a["txt"], b["txt"]) > 0.0


def test_metrics_rows_have_model_tflops_per_device(reference_run):
  from fszjax import flops

  wd, _ = reference_run
  cfg = config_lib.load_config(os.path.join(wd, "config.json"))
  per_step = flops.train_flops_per_step(cfg.model, cfg.batch_size) / 1e12
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    rows = [r for r in map(json.loads, f) if "loss" in r]
  assert len(rows) == 12  # log_every=1
  for r in rows:
    # Achieved model TFLOP/s per device = FLOPs per step x steps/s over the 8 devices.
    want = per_step * r["examples_per_sec"] / cfg.batch_size / 8
    assert r["model_tflops_per_device"] == pytest.approx(want, rel=1e-6)
    assert "mfu" not in r  # no known peak for a CPU
