"""`fszjax bench pretrain`: the train step on synthetic data of the config's shapes.

Prints one JSON line: loss_first, loss_last, step_time_s (median, compile excluded),
examples_per_sec_per_device, mfu, model_tflops_per_step, devices, mesh, ...
No dataset is needed; the data are fixed by the seed.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import numpy as np

from fszjax import config as config_lib
from fszjax import flops, pretrain, sharding


def synthetic_batches(config, global_batch: int, seed: int, count: int = 4):
  """`count` distinct batches: normal images and token rows ending in the EOT id (V-1)."""
  img_shape, tok_shape = pretrain.input_shapes(config, global_batch)
  rng = np.random.default_rng(seed)
  vocab = config.model.text.vocab_size
  out = []
  for _ in range(count):
    images = rng.normal(size=img_shape).astype(np.float32)
    tokens = rng.integers(1, vocab - 1, size=tok_shape).astype(np.int32)
    lengths = rng.integers(1, tok_shape[1], size=global_batch)
    for i, n in enumerate(lengths):
      tokens[i, n] = vocab - 1
      tokens[i, n + 1:] = 0
    out.append({"image": images, "tokens": tokens})
  return out


def bench_pretrain(config, steps: int = 10, peak_tflops: float | None = None,
                   devices=None) -> dict:
  mesh = sharding.mesh_from_config(config.mesh, devices=devices)
  rules = sharding.rules_from_config(config)
  sharding.check_global_batch(config.batch_size, mesh)
  state, model, tx, schedule = pretrain.create_train_state(config, mesh, rules)
  step = pretrain.make_train_step(model, tx, schedule, config, mesh, rules,
                                  state_shardings=sharding.shardings_of(state))
  batches = [sharding.host_to_global(b, mesh)
             for b in synthetic_batches(config, config.batch_size, config.seed)]
  losses, times = [], []
  for i in range(steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batches[i % len(batches)])
    loss = float(jax.block_until_ready(metrics["loss"]))
    times.append(time.perf_counter() - t0)
    losses.append(loss)
  step_time = statistics.median(times[1:]) if len(times) > 1 else times[0]
  n_dev = mesh.devices.size
  tflops = flops.train_flops_per_step(config.model, config.batch_size) / 1e12
  kind = jax.devices()[0].device_kind
  peak = peak_tflops or (flops.peak_tflops(kind) if jax.default_backend() != "cpu" else None)
  mfu = (tflops / step_time / n_dev / peak) if peak else None
  return {
      "bench": "pretrain",
      "loss_first": losses[0],
      "loss_last": losses[-1],
      "steps": steps,
      "step_time_s": step_time,
      "compile_step_time_s": times[0],
      "examples_per_sec": config.batch_size / step_time,
      "examples_per_sec_per_device": config.batch_size / step_time / n_dev,
      "model_tflops_per_step": tflops,
      "achieved_tflops_per_device": tflops / step_time / n_dev,
      "peak_tflops_per_device": peak,
      "mfu": mfu,
      "devices": n_dev,
      "device_kind": kind,
      "mesh": dict(mesh.shape),
      "global_batch": config.batch_size,
      "loss": config.loss,
      "dtype": config.model.dtype,
  }


def main(args, overrides) -> int:
  cfg = config_lib.load_config(args.config, overrides)
  result = bench_pretrain(cfg, steps=args.steps, peak_tflops=args.peak_tflops)
  print(json.dumps(result), flush=True)
  return 0
