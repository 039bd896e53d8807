"""Run by tests/test_multihost.py in every process of a local 2-process job: a few
second-order MAML meta-steps (Conv-4) with the meta-batch sharded over every device of
the job. Process 0 writes OUT_DIR/meta_params.npz. `run_meta` is also what the test runs
in one process to compare."""

import os
import sys

import jax
import numpy as np

T, N_WAY = 8, 3


def make_tasks():
  rng = np.random.default_rng(0)
  y = np.tile(np.arange(N_WAY, dtype=np.int32), (T, 1))
  return {"support_x": rng.normal(size=(T, N_WAY, 28, 28, 1)).astype(np.float32),
          "support_y": y,
          "query_x": rng.normal(size=(T, N_WAY, 28, 28, 1)).astype(np.float32),
          "query_y": y.copy()}


def run_meta(mesh, steps=3):
  """Meta-steps on `mesh` (tasks sharded over its batch axes). Returns host params."""
  import optax  # noqa: PLC0415

  from fszjax import sharding  # noqa: PLC0415
  from fszjax.fewshot import conv4, meta  # noqa: PLC0415

  cfg = meta.MetaConfig(algorithm="maml", n_way=N_WAY, inner_steps=2, inner_lr=0.4,
                        head_init="zeros")
  params = conv4.init_conv4(jax.random.key(0), N_WAY, hidden=8)
  opt = optax.adam(1e-2)
  rep = sharding.replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, rep, lambda idx: x[idx])

  params = jax.tree.map(put, jax.device_get(params))
  opt_state = jax.tree.map(put, jax.device_get(opt.init(params)))
  tasks = make_tasks()
  n, pid = jax.process_count(), jax.process_index()
  local = {k: v[pid * T // n:(pid + 1) * T // n] for k, v in tasks.items()}
  gtasks = sharding.host_to_global(local, mesh, T)
  step = meta.make_meta_step(conv4.make_conv4_features_fn(), cfg, opt, mesh=mesh, donate=False)
  losses = []
  for _ in range(steps):
    params, opt_state, metrics = step(params, opt_state, gtasks)
    losses.append(float(metrics["loss"].addressable_data(0)))
  host = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), params)
  return host, losses


def main(out_dir):
  jax.config.update("jax_num_cpu_devices", int(os.environ["FSZJAX_CPU_DEVICES"]))
  import argparse  # noqa: PLC0415

  from fszjax import multihost, sharding  # noqa: PLC0415

  parser = argparse.ArgumentParser()
  multihost.add_flags(parser)
  args = parser.parse_args([])
  args.command = "probe"
  multihost.initialize_from_args(args)
  mesh = sharding.make_mesh(-1, 1, 1)
  host, losses = run_meta(mesh)
  if multihost.is_main():
    from fszjax.tree import flatten  # noqa: PLC0415

    flat = flatten(host)
    np.savez(os.path.join(out_dir, "meta_params.npz"), losses=np.asarray(losses), **flat)
  multihost.sync("done")


if __name__ == "__main__":
  main(sys.argv[1])
