"""Test set-up: 8 simulated CPU devices, configured before JAX starts its backend."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

# A compilation cache shared by the pytest workers and the CLI subprocesses the tests
# start: many tests compile the same tiny train step.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.join(os.environ.get("TMPDIR", "/tmp"), "fszjax-test-jax-cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1.0")


import pytest  # noqa: E402

import data_testlib  # noqa: E402


@pytest.fixture(scope="module")
def gdir(tmp_path_factory):
  """A small Glyphs dataset, built once per test module (tests/data_testlib.py)."""
  return data_testlib.glyphs_data_dir(tmp_path_factory)
