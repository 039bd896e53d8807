"""Faults a hostile user (or a bad day) brings, with real files and real subprocesses:
a corrupt newest checkpoint, a disk that fills during a save, a read-only workdir, two
writers on one workdir, a diverging loss, malformed manifests, weight files and model
paths. Each ends in exit status 2 and one line on stderr naming the file and the fix
(or a warning with a count), and no checkpoint written before becomes unreadable.
(README "Faults and recovery".)"""

import ctypes
import glob
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

import data_testlib
from fszjax import checkpoint, pretrain, train_cli, workdir
from fszjax.convert import common
from fszjax.data import image_text
from helpers import max_abs_diff
from test_pretrain_run import ROOT, _cli, load_cfg, run_overrides

# The faults run: 8 steps, checkpoints at 4 and 8, synchronous saves.
RUN = ["--config.total_steps=8", "--config.checkpoint.save_every=4",
       "--config.checkpoint.async_save=False"]


@pytest.fixture(scope="module")
def done_run(gdir, tmp_path_factory):
  """An uninterrupted 8-step run (checkpoints 4 and 8): the reference and the material."""
  wd = str(tmp_path_factory.mktemp("faults") / "ref")
  pretrain.train(load_cfg(gdir, *RUN), wd)
  return wd


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _corrupt_step(wd, step):
  """Overwrites every data file of the step's state item (as a torn write would)."""
  for root, _, files in os.walk(os.path.join(wd, "checkpoints", str(step), "state")):
    for f in files:
      if not f.startswith("_"):
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")


def _pretrain_cmd(gdir, wd, *extra):
  args = ["pretrain", "--config", os.path.join(ROOT, "configs/glyphs.py"), "--workdir", wd]
  return _cli(args + run_overrides(gdir, *RUN, *extra))


def _error_lines(stderr: str) -> list[str]:
  """Non-empty stderr lines that are not INFO/WARNING log records."""
  return [l for l in stderr.splitlines()
          if l.strip() and not re.match(r"^(\d\d:\d\d:\d\d )?(INFO|WARNING)[: ]", l)]


def _assert_one_line(r, *words):
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  lines = _error_lines(r.stderr)
  assert len(lines) == 1 and lines[0].startswith("fszjax: error: "), r.stderr[-3000:]
  for w in words:
    assert w in lines[0], lines[0]
  return lines[0]


def _readable_steps(wd):
  ck = checkpoint.Checkpointer(os.path.join(wd, "checkpoints"), read_only=True)
  steps = ck.all_steps()
  for s in steps:  # every listed step's params load
    checkpoint.load_params_numpy(os.path.join(wd, "checkpoints", str(s)))
  return steps


# ------------------------------------------------------------------ checkpoints that heal


def test_corrupt_newest_checkpoint_heals_to_identical_params(gdir, done_run, tmp_path):
  ref_params = checkpoint.load_params_numpy(done_run)
  # Read-only users fall back without moving anything: fszjax.load / init_from and eval.
  ro = _copy(done_run, tmp_path / "ro")
  _corrupt_step(ro, 8)
  params4 = checkpoint.load_params_numpy(os.path.join(done_run, "checkpoints", "4"))
  assert max_abs_diff(checkpoint.load_params_numpy(ro), params4) == 0.0
  overrides = [(k[len("--config."):].split("=", 1)[0], k.split("=", 1)[1])
               for k in run_overrides(gdir) if k.startswith("--config.data")]
  result = train_cli.evaluate_checkpoint(ro, None, overrides, out_path=str(tmp_path / "e.json"))
  assert result["steps"] == 4
  before = sorted(os.listdir(os.path.join(done_run, "checkpoints")))
  assert "4" in before and "8" in before
  assert sorted(os.listdir(os.path.join(ro, "checkpoints"))) == before  # nothing moved
  # The same command again: falls back to 4, moves 8 aside, trains 5..8 again.
  wd = _copy(done_run, tmp_path / "wd")
  _corrupt_step(wd, 8)
  cmd, env = _pretrain_cmd(gdir, wd)
  r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  warn = sorted({re.sub(r"^.*?fszjax: ?", "", l) for l in r.stderr.splitlines()
                 if "corrupt or incomplete" in l})  # one message (however many log handlers)
  assert len(warn) == 1 and "[8]" in warn[0] and "resuming from step 4" in warn[0], r.stderr[-2000:]
  aside = glob.glob(os.path.join(wd, "checkpoints", "8.corrupt-*"))
  assert len(aside) == 1 and os.path.basename(aside[0]) in warn[0]
  assert os.path.isdir(os.path.join(aside[0], "state"))  # kept for inspection, not deleted
  assert _readable_steps(wd)[-2:] == [4, 8]
  assert max_abs_diff(checkpoint.load_params_numpy(wd), ref_params) == 0.0  # bitwise
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert [r_["step"] for r_ in rows] == list(range(1, 9))  # no duplicated rows


def test_keep_policy_never_leaves_one_step(tmp_path):
  import jax.numpy as jnp

  ck = checkpoint.Checkpointer(str(tmp_path / "c"), save_every=1, keep=1, async_save=False)
  for s in (1, 2, 3):
    ck.save(s, {"w": jnp.full((4,), float(s))}, force=True)
  ck.close()
  assert ck.all_steps() == [2, 3]


# ------------------------------------------------------------------ storage faults


def _limit_file_size(nbytes):
  def pre():
    # Writes past `nbytes` fail with EFBIG (Python ignores SIGXFSZ), like a full disk
    # for the arrays' data files; small files (config, metrics) still fit.
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.RLIM_INFINITY))
  return pre


def test_failed_save_one_line_previous_checkpoint_intact_then_resume(gdir, done_run, tmp_path):
  wd = _copy(done_run, tmp_path / "full")
  state_bytes = sum(os.path.getsize(p) for p in glob.glob(
      os.path.join(wd, "checkpoints", "8", "state", "**", "*"), recursive=True) if os.path.isfile(p))
  limit = 64_000
  assert state_bytes > 4 * limit  # the state's data file cannot be written
  cmd, env = _pretrain_cmd(gdir, wd, "--config.total_steps=12")
  env["JAX_ENABLE_COMPILATION_CACHE"] = "false"  # cache entries are larger than the limit
  r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
                     preexec_fn=_limit_file_size(limit))
  line = _assert_one_line(r, "cannot write checkpoint step 12", os.path.join(wd, "checkpoints"),
                          "File too large", "need about", "step 8 is intact", "rerun")
  assert "MB" in line
  names = sorted(os.listdir(os.path.join(wd, "checkpoints")))
  assert names == sorted(os.listdir(os.path.join(done_run, "checkpoints"))), names  # partial 12 removed
  assert _readable_steps(wd)[-2:] == [4, 8]
  # Space is back: the same command resumes from 8 and finishes.
  summary = pretrain.train(load_cfg(gdir, *RUN, "--config.total_steps=12"), wd)
  assert summary["resumed_from"] == 8 and summary["steps"] == 12
  assert _readable_steps(wd)[-1] == 12


def test_save_error_retry_keeps_training(tmp_path, monkeypatch, caplog):
  """on_save_error=retry: a full disk at one save is logged in one line; the next save works."""
  import errno

  import jax.numpy as jnp

  ck = checkpoint.Checkpointer(str(tmp_path / "c"), save_every=1, keep=2, async_save=False,
                               on_save_error="retry")
  ck.save(1, {"w": jnp.ones(4)}, force=True)
  real = ck.manager.save

  def full(step, *a, **k):
    if step == 2:
      raise OSError(errno.ENOSPC, "No space left on device", "/x/ocdbt.process_0/d/abc")
    return real(step, *a, **k)

  monkeypatch.setattr(ck.manager, "save", full)
  with caplog.at_level("WARNING", logger="fszjax"):
    assert ck.save(2, {"w": jnp.ones(4)}, force=True) is False
  assert any("cannot write checkpoint step 2" in r.message and "No space left" in r.message
             and "retrying" in r.message for r in caplog.records)
  assert ck.save(3, {"w": jnp.ones(4)}, force=True)
  ck.close()
  assert ck.all_steps() == [1, 3]
  with pytest.raises(checkpoint.StorageError, match="on_save_error"):
    ck2 = checkpoint.Checkpointer(str(tmp_path / "d"), async_save=False)
    monkeypatch.setattr(ck2.manager, "save", full)
    ck2.save(2, {"w": jnp.ones(4)}, force=True)


def _drop_dac_override():
  """Run as root: drop CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH from the bounding set before
  exec, so the child obeys permission bits as any user does (chmod a-w then blocks it)."""
  libc = ctypes.CDLL(None, use_errno=True)
  for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
      raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _chmod_tree(path, write: bool):
  for root, dirs, files in os.walk(path):
    for n in dirs + files:
      p = os.path.join(root, n)
      mode = os.stat(p).st_mode
      os.chmod(p, (mode | 0o200) if write else (mode & ~0o222))
  mode = os.stat(path).st_mode
  os.chmod(path, (mode | 0o200) if write else (mode & ~0o222))


def test_read_only_workdir_one_line(gdir, done_run, tmp_path):
  wd = _copy(done_run, tmp_path / "ro")
  _chmod_tree(wd, write=False)
  try:
    cmd, env = _pretrain_cmd(gdir, wd, "--config.total_steps=12")
    t0 = time.time()
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       preexec_fn=_drop_dac_override if os.geteuid() == 0 else None)
    _assert_one_line(r, wd, "not writable", "chmod")
  finally:
    _chmod_tree(wd, write=True)
  assert _readable_steps(wd)[-2:] == [4, 8]
  assert time.time() - t0 < 120  # refused before the model is built


def test_free_space_checked_before_the_first_step(gdir, tmp_path, monkeypatch):
  monkeypatch.setattr(workdir, "free_bytes", lambda path: 1000)
  with pytest.raises(workdir.WorkdirError, match=r"has 0\.0 MB free but two checkpoints of this "
                     r"run need about .* MB; free"):
    pretrain.train(load_cfg(gdir, *RUN), str(tmp_path / "w"))
  assert not os.path.exists(os.path.join(tmp_path, "w", "metrics.jsonl"))


# ------------------------------------------------------------------ two writers


def test_second_writer_refused_and_a_crashed_lock_is_not_stuck(gdir, tmp_path):
  wd = str(tmp_path / "shared")
  cmd, env = _pretrain_cmd(gdir, wd, "--config.total_steps=100000")
  first = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None and not workdir.is_locked(wd):
      time.sleep(0.1)
    holder = workdir.is_locked(wd)
    assert holder and f"pid {first.pid}" in holder
    r = subprocess.run(_pretrain_cmd(gdir, wd)[0], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    _assert_one_line(r, wd, "in use by another run", f"pid {first.pid}", "another --workdir")
  finally:
    first.send_signal(signal.SIGKILL)  # a crash: no clean-up runs
    first.wait(timeout=60)
  assert workdir.is_locked(wd) is None  # the OS released it with the process
  with workdir.WorkdirLock(wd):
    assert "pid" in open(os.path.join(wd, workdir.LOCK_NAME)).read()


# ------------------------------------------------------------------ divergence


def test_divergence_message_is_followed_and_the_rerun_finishes(gdir, tmp_path):
  """lr 0 at step 1 (warmup), then 2.5e29: checkpoint 1 is the initial model, checkpoint 2
  garbage whose loss (step 3) explodes. The message names step 1; rerunning with a lower
  lr resumes there and finishes."""
  wd = str(tmp_path / "div")
  bad = ["--config.optim.lr=1e30", "--config.optim.schedule=constant",
         "--config.optim.warmup_steps=4", "--config.optim.clip_norm=0.0",
         "--config.checkpoint.save_every=1"]
  cmd, env = _pretrain_cmd(gdir, wd, *bad)
  r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  line = _assert_one_line(r, "at step 3", "training diverged", "resumes from step 1",
                          "--config.optim.lr", "--fresh")
  m = re.search(r"moved aside to (\S+)", line)
  assert m and os.path.isdir(m.group(1).rstrip(";"))  # set aside, not deleted
  assert _readable_steps(wd) == [1]
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert max(r_["step"] for r_ in rows) == 2  # the spiking step is not logged as a result
  # Follow the message: same command, lower lr.
  good = [a for a in bad if "optim.lr" not in a] + ["--config.optim.lr=0.003"]
  summary = pretrain.train(load_cfg(gdir, *RUN, *good), wd)
  assert summary["resumed_from"] == 1 and summary["steps"] == 8
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert [r_["step"] for r_ in rows] == list(range(1, 9))
  assert all(np.isfinite(r_["loss"]) and r_["loss"] < 10 for r_ in rows)


def test_loss_monitor_spikes_and_noise():
  mon = pretrain.LossMonitor(factor=10.0)
  for s, loss in enumerate([2.8, 2.7, 2.9, 2.6], start=1):
    mon.check(loss, s)
  mon.check(5.0, 5)  # noisy but not 10x
  assert mon.last_ok == 5
  with pytest.raises(pretrain.TrainingDiverged, match="more than 10x the median 2.8"):
    mon.check(40.0, 6)
  with pytest.raises(pretrain.TrainingDiverged, match="loss is nan at step 7"):
    mon.check(float("nan"), 7)
  low = pretrain.LossMonitor(factor=10.0, history=[0.01, 0.012])
  low.check(0.3, 3)  # 30x a near-zero median, but a small absolute jump: not a spike
  assert mon.last_ok == 5 and low.last_ok == 3


# ------------------------------------------------------------------ malformed inputs


def _imgs(tmp_path):
  data_testlib.write_image_folder(str(tmp_path / "imgs"), classes=("yak",), per_class=2)


def test_manifest_errors_name_the_file_and_fix(tmp_path, caplog):
  _imgs(tmp_path)
  m = tmp_path / "cols.csv"
  m.write_text("picture,words\nimgs/yak/0.png,a yak\n")
  with pytest.raises(image_text.UserDataError, match=r"line 1 .*neither a header with the required "
                     r"columns \(image_path, caption\)"):
    image_text.read_manifest(str(m))
  m.write_text("image_path,tags\nimgs/yak/0.png,a yak\n")
  with pytest.raises(image_text.UserDataError, match="no caption column"):
    image_text.read_manifest(str(m))
  m = tmp_path / "latin1.tsv"
  m.write_bytes("imgs/yak/0.png\ta yak\nimgs/yak/1.png\tun caf\u00e9\n".encode("latin-1"))
  with pytest.raises(image_text.UserDataError, match=r"line 2 is not UTF-8 \(byte 0xe9 at column "
                     r"22\); re-save the file as UTF-8"):
    image_text.read_manifest(str(m))
  m = tmp_path / "empty.tsv"
  m.write_text("image\tcaption\nimgs/yak/0.png\ta yak\nimgs/yak/1.png\t  \nimgs/yak/0.png\t\n")
  with caplog.at_level("WARNING"):
    rows = image_text.read_manifest(str(m))
  assert rows == {"train": [(str(tmp_path / "imgs/yak/0.png"), ["a yak"])]}
  assert any("2 row(s) with an empty caption skipped (first: line 3)" in r.message
             for r in caplog.records)
  m = tmp_path / "gone.tsv"
  m.write_text("nowhere/a.png\tcap\nnowhere/b.png\tcap\n")
  with pytest.raises(image_text.UserDataError, match=r"none of its 2 image\(s\) exist"):
    image_text.read_manifest(str(m))


def test_prepare_bad_manifest_cli_one_line(tmp_path):
  _imgs(tmp_path)
  m = tmp_path / "bad.tsv"
  m.write_bytes(b"imgs/yak/0.png\ta yak\nimgs/yak/1.png\t\xff\xfe\n")
  cmd, env = _cli(["prepare", "captions", str(m), "--name", "bad", "--data_dir",
                   str(tmp_path / "data")])
  r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  _assert_one_line(r, str(m), "line 2 is not UTF-8", "re-save")
  assert not os.path.exists(tmp_path / "data" / "user_image_captions" / "bad")


def _safetensors(path, tensors, cut=0, shape_of=None):
  header, blob = {}, b""
  for name, a in tensors.items():
    header[name] = {"dtype": "F32", "shape": list((shape_of or {}).get(name, a.shape)),
                    "data_offsets": [len(blob), len(blob) + a.nbytes]}
    blob += a.tobytes()
  h = json.dumps(header).encode()
  data = struct.pack("<Q", len(h)) + h + blob
  with open(path, "wb") as f:
    f.write(data[:len(data) - cut] if cut else data)


def test_weight_files_truncated_or_mismatched(tmp_path):
  w = {"visual.proj": np.ones((512, 512), np.float32), "logit_scale": np.ones((), np.float32)}
  p = str(tmp_path / "t.safetensors")
  _safetensors(p, w, cut=1000)
  with pytest.raises(common.ConvertError, match=r"t\.safetensors: tensor visual\.proj \(shape "
                     r"\(512, 512\), F32\) needs bytes 0\.\.1048576 but the data ends at "
                     r"1047580; the file is truncated"):
    common.read_weights(p)
  _safetensors(p, w, shape_of={"visual.proj": (512, 500)})
  with pytest.raises(common.ConvertError, match=r"tensor visual\.proj should hold shape "
                     r"\(512, 500\) .* but its data is 1048576 bytes"):
    common.read_weights(p)
  npz = str(tmp_path / "w.npz")
  np.savez(npz, **{"img/embedding/kernel": np.ones((4, 4, 3, 8), np.float32)})
  raw = open(npz, "rb").read()
  with open(npz, "wb") as f:
    f.write(raw[:len(raw) // 2])
  with pytest.raises(common.ConvertError, match=r"w\.npz is not a readable \.npz .*truncated"):
    common.read_weights(npz)


def test_load_and_eval_on_things_that_are_not_models(tmp_path):
  import fszjax
  from fszjax import inference

  rnd = tmp_path / "random.bin"
  rnd.write_bytes(np.random.default_rng(0).bytes(4096))
  d = tmp_path / "dir"
  d.mkdir()
  (d / "config.json").write_bytes(np.random.default_rng(1).bytes(4096))
  for p, words in ((rnd, "is a file, not a fszjax model"), (d, "is not a loadable fszjax model")):
    with pytest.raises(inference.LoadError, match=words):
      fszjax.load(str(p))
  cmd, env = _cli(["eval", "--workdir", str(tmp_path / "dir")])
  r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  _assert_one_line(r, str(tmp_path / "dir"), "without a fszjax checkpoint", "pass a fszjax workdir")


def test_init_from_not_a_checkpoint_fails_before_the_model_is_built(gdir, tmp_path, monkeypatch):
  (tmp_path / "notckpt").mkdir()
  built = []
  monkeypatch.setattr(pretrain, "create_train_state", lambda *a, **k: built.append(1))
  with pytest.raises(checkpoint.CheckpointError, match=r"config\.init_from=.*notckpt: .*without a "
                     r"fszjax checkpoint"):
    pretrain.train(load_cfg(gdir, f"--config.init_from={tmp_path / 'notckpt'}"), str(tmp_path / "w"))
  with pytest.raises(Exception, match=r"not prepared|no_such_split|split"):
    pretrain.train(load_cfg(gdir, "--config.eval.splits=['no_such_split']"), str(tmp_path / "w2"))
  assert not built
