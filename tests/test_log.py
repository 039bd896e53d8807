"""The log of a run captured to a file: no escape codes or progress bars, no third-party
INFO lines, and every stage says how long it took (with an ETA for long loops)."""

import logging
import os
import re
import subprocess
import sys

from fszjax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX = 150
TINY = ["--config.data.tokenizer.vocab_size=256", "--config.model.text.vocab_size=256",
        "--config.data.num_threads=1", "--config.batch_size=16", "--config.model.embed_dim=16",
        "--config.model.image.width=32", "--config.model.image.depth=1",
        "--config.model.image.mlp_dim=64", "--config.model.image.num_heads=2",
        "--config.model.image.patch_size=8", "--config.model.text.width=32",
        "--config.model.text.depth=1", "--config.model.text.mlp_dim=64",
        "--config.model.text.num_heads=2", "--config.total_steps=4", "--config.log_every=2",
        "--config.eval_every=4", "--config.eval.max_examples=16",
        "--config.checkpoint.best_metric=", f"--config.data.glyphs.max_chars={MAX}"]


def _run(args, log_path):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  with open(log_path, "ab") as f:  # a file, not a terminal: what `launch/local.sh > log` sees
    rc = subprocess.run([sys.executable, "-m", "fszjax.cli", *args], cwd=ROOT, env=env,
                        stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                        timeout=600).returncode
  return rc


def test_captured_log_is_plain_quiet_and_timed(tmp_path):
  log_path = str(tmp_path / "run.log")
  data = str(tmp_path / "data")
  assert _run(["prepare", "glyphs", "--data_dir", data, "--max_chars", str(MAX)], log_path) == 0
  assert _run(["pretrain", "--config", "configs/glyphs.py", "--workdir", str(tmp_path / "wd"),
               f"--config.data.data_dir={data}", *TINY], log_path) == 0
  text = open(log_path, encoding="utf-8", errors="replace").read()
  assert "\x1b[" not in text and "\r" not in text, "escape codes or progress bars in the log"
  records = re.findall(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ([\w.]+): (.*)$", text, re.M)
  assert records
  others = [r for r in records if r[0] == "INFO" and not r[1].startswith("fszjax")]
  assert not others, others
  assert "Downloading and preparing" not in text and "Using custom data configuration" not in text
  # Stages and evaluations say what they do and how long it took; long loops give an ETA.
  assert re.search(r"glyphs: prepared in \d+\.\d s", text)
  assert re.search(r"zero-shot evaluation at step 4: done in \d+\.\d s", text)
  assert re.search(r"step 2/4 loss .* ETA ", text)


def test_progress_without_terminal_logs_eta_lines(caplog):
  caplog.set_level(logging.INFO, logger="fszjax")
  p = metrics.Progress(10, desc="episodes", every_s=0.0, terminal=False)
  for _ in range(10):
    p.update(1, acc=0.5)
  p.close()
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("episodes:")]
  assert len(lines) == 10 and p.bar is None
  assert lines[4].startswith("episodes: 5/10 (50%)") and "ETA" in lines[4] and "acc 0.5" in lines[4]


def test_durations_and_eta_read_well():
  assert metrics.format_duration(12.34) == "12.3 s"
  assert metrics.format_duration(185) == "3 min 05 s"
  assert metrics.format_duration(3720) == "1 h 02 min"
  assert metrics.eta(0, 10, 5.0) == "?"
  assert metrics.eta(5, 10, 50.0) == "50.0 s"
  assert metrics.eta(2, 10, 60.0) == "4 min 00 s"


def test_setup_logging_levels():
  metrics.setup_logging()
  assert logging.getLogger("fszjax").getEffectiveLevel() == logging.INFO
  assert logging.getLogger("fszjax.data.glyphs").isEnabledFor(logging.INFO)
  for name in ("absl", "orbax", "jax._src.xla_bridge", "tensorflow_datasets", "grain"):
    assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
  metrics.setup_logging()  # idempotent: one handler
  assert sum(getattr(h, "_fszjax_handler", False) for h in logging.getLogger().handlers) == 1
