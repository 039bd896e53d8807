"""`fszjax bench adapt` on a tiny synthetic workload; importable without grain / TFDS."""

import json
import subprocess
import sys

import pytest

from fszjax.fewshot import bench

TINY = dict(hidden=4, layers=1, image_size=8, inner_steps=1, meta_batch=4, steps=2, warmup=0)


def test_bench_adapt_strategies():
  out = bench.bench_adapt(TINY, devices=2, task_chunk=1, algorithm="fomaml", remat=False,
                          formulation="im2col")
  assert out["tasks_per_sec"] > 0 and out["devices"] == 2 and out["meta_batch"] == 4
  assert out["algorithm"] == "fomaml" and out["inner_steps"] == 1 and out["formulation"] == "im2col"
  # A partial adapt config (fszjax/config_defaults.py keys) over learn2learn's workload.
  tiny_meta = dict(hidden=4, layers=1, inner_steps=1, meta_batch=4, algorithm="protonet")
  loop = bench.bench_adapt({"fewshot": {"image_size": 8, "meta": tiny_meta},
                            "bench": {"steps": 2, "warmup": 0}}, strategy="task_loop")
  assert loop["strategy"] == "task_loop" and loop["algorithm"] == "protonet"


def test_main_prints_one_json_line(capsys):
  assert bench.main(["--hidden=4", "--layers=1", "--image_size=8", "--inner_steps=0", "--meta_batch=2",
                     "--steps", "1", "--warmup=0", "--devices=1", "--algorithm=protonet"]) == 0
  line = capsys.readouterr().out.strip().splitlines()
  assert len(line) == 1 and json.loads(line[0])["algorithm"] == "protonet"


def test_bench_imports_without_data_deps():
  # ml-collections (small, pure Python) is needed: configs are read by fszjax.config, and
  # benchmarks/gpu.sh installs it; grain and TFDS may be missing on the GPU machine.
  code = ("import sys; import fszjax.fewshot.bench, fszjax.fewshot.meta; "
          "bad = [m for m in ('grain', 'tensorflow_datasets', 'tensorflow') "
          "if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_refuses_a_towers_config():
  with pytest.raises(bench.BenchError, match="Conv-4"):
    bench.bench_adapt({"fewshot": {"backbone": "towers"}})
