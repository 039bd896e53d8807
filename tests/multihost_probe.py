"""Run by tests/test_multihost.py in every process of a local multi-process job (through
launch/multiprocess_cpu.sh): the multihost helpers and a global batch assembled from
every process's rows. Writes OUT_DIR/process_<i>.json."""

import argparse
import json
import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", int(os.environ["FSZJAX_CPU_DEVICES"]))

from fszjax import multihost  # noqa: E402


def main(out_dir):
  parser = argparse.ArgumentParser()
  multihost.add_flags(parser)
  args = parser.parse_args([])
  args.command = "probe"
  mode = multihost.initialize_from_args(args)

  import numpy as np  # noqa: PLC0415

  from fszjax import sharding  # noqa: PLC0415

  pid, n = multihost.process_index(), multihost.process_count()
  multihost.sync("start")
  multihost.sync("start")  # the same name again is a new barrier
  # Process p holds rows [p * b, (p + 1) * b) of a global batch whose row i is i.
  mesh = sharding.make_mesh(-1, 1, 1)
  b = 2 * jax.local_device_count()
  local = np.arange(pid * b, (pid + 1) * b, dtype=np.float32)
  g = sharding.host_to_global({"x": local}, mesh, b * n)["x"]
  weights = jax.numpy.arange(b * n, dtype=jax.numpy.float32)
  dot = float(jax.jit(lambda x, w: x @ w, out_shardings=sharding.replicated(mesh))(g, weights))
  multihost.sync("end")
  with open(os.path.join(out_dir, f"process_{pid}.json"), "w") as f:
    json.dump({"mode": mode, "process_index": pid, "process_count": n,
               "is_main": multihost.is_main(), "devices": jax.device_count(),
               "local_devices": jax.local_device_count(), "dot": dot,
               "describe": multihost.describe()}, f)


if __name__ == "__main__":
  main(sys.argv[1])
