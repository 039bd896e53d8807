"""The meta-training loop of `fszjax adapt` (Conv-4 from scratch and the image tower):
the outer optimizer, device sharing of the meta-batch, and `meta_train` with Orbax
checkpoints, exact resume, preemption, Ctrl-C and non-finite-loss handling."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fszjax import checkpoint, interrupt, sharding
from fszjax import loop as loop_lib
from fszjax import metrics as metrics_lib
from fszjax.fewshot import meta as meta_lib
from fszjax.fewshot.episodes import AdaptError

log = logging.getLogger("fszjax")


def tasks_of(ep: dict, text: np.ndarray | None = None) -> dict:
  """The arrays of a sampled meta-batch that the meta-step takes (+ class text embeddings)."""
  tasks = {k: ep[k] for k in ("support_x", "support_y", "query_x", "query_y")}
  if text is not None:
    tasks["text_emb"] = text[ep["classes"]]
  return tasks


def outer_optimizer(m) -> optax.GradientTransformation:
  """The meta-optimizer of ``config.fewshot.meta``: Adam (SGD for Reptile, whose "gradient"
  is the step towards the adapted weights) at ``outer_lr``, constant or, with
  ``outer_schedule='cosine'``, linear warmup over ``warmup_steps`` then cosine decay to 0
  at ``steps``."""
  lr = float(m.outer_lr)
  schedule = m.get("outer_schedule", "constant")
  if schedule == "cosine":
    total = max(int(m.steps), 1)
    warmup = min(int(m.get("warmup_steps", 0)), total - 1)
    lr = optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, total, 0.0)
  elif schedule != "constant":
    raise AdaptError(f"config.fewshot.meta.outer_schedule={schedule!r}: use 'constant' or 'cosine'")
  return optax.sgd(lr) if m.algorithm == "reptile" else optax.adam(lr)


def local_devices(m) -> int:
  """Devices that share the meta-batch and the evaluation episodes: this process's devices
  (``fewshot.meta.devices``: 0 = all, else at most that many). With several processes each
  runs the whole (identical) work on one device."""
  n = jax.local_device_count() if jax.process_count() == 1 else 1
  want = int(m.get("devices", 0) or 0)
  return min(n, want) if want else n


def meta_train(config, ckpt_dir: str, features_fn, mcfg: meta_lib.MetaConfig, meta_params,
               sample: Callable[[int], dict]):
  """Meta-trains ``config.fewshot.meta.steps`` steps on ``sample(step)`` meta-batches, with
  Orbax checkpoints in `ckpt_dir` and exact resume (batches are drawn by step index);
  on preemption (SIGTERM) it saves and exits 0, on Ctrl-C it saves and raises
  `KeyboardInterrupt`, on a non-finite loss it stops with the last good checkpoint kept.
  Returns the meta-params."""
  m = config.fewshot.meta
  opt = outer_optimizer(m)
  opt_state = opt.init(meta_params)
  mesh = None
  ndev = local_devices(m)
  if ndev > 1 and int(m.meta_batch) % ndev == 0:
    mesh = sharding.make_mesh(ndev, 1, 1, devices=jax.local_devices()[:ndev])
    log.info("meta-batch of %d tasks sharded over %d devices", int(m.meta_batch), ndev)
  elif ndev > 1:
    log.warning("meta_batch=%d is not a multiple of the %d devices: meta-training on one",
                int(m.meta_batch), ndev)
  step_fn = meta_lib.make_meta_step(features_fn, mcfg, opt, mesh=mesh, donate=False)
  ckpt = checkpoint.Checkpointer(ckpt_dir, save_every=int(config.checkpoint.save_every),
                                 keep=int(config.checkpoint.keep), async_save=False,
                                 on_save_error=config.checkpoint.get("on_save_error", "stop"))
  state = {"step": jnp.zeros((), jnp.int32), "params": meta_params, "opt_state": opt_state}
  start = 0
  if ckpt.all_steps():
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    start, state = ckpt.restore(abstract)
    log.info("resumed meta-training at step %d", start)
  meta_params, opt_state = state["params"], state["opt_state"]
  ckpt.reached_preemption(start)  # JAX's sync point counts from the last reported step
  total = int(m.steps)
  t0 = time.perf_counter()
  log_every = int(config.log_every)
  # Meta-training curves: WORKDIR/metrics.jsonl and WORKDIR/tensorboard (process 0).
  writer = metrics_lib.MetricWriter(os.path.dirname(os.path.abspath(ckpt_dir)),
                                    enabled=jax.process_index() == 0)
  writer.truncate_after(start)
  with interrupt.StopRequest("meta-training") as stop:
    for step in range(start + 1, total + 1):
      meta_params, opt_state, metrics = step_fn(meta_params, opt_state, sample(step))
      if step % log_every == 0 or step == total:  # the only host sync of a step
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(host["loss"]):
          raise AdaptError(f"meta-training loss is {host['loss']} at step {step}; lower "
                           "config.fewshot.meta.outer_lr (the last good checkpoint is kept)")
        elapsed = time.perf_counter() - t0
        rate = (step - start) * int(m.meta_batch) / elapsed
        log.info("meta step %d/%d loss %.4f query acc %.3f %.1f tasks/s, ETA %s", step, total,
                 host["loss"], host["acc"], rate,
                 metrics_lib.eta(step - start, total - start, elapsed))
        writer.write(step, {**host, "tasks_per_sec": rate})
      end = loop_lib.step_end(ckpt, step, total, stop)
      if end.save:
        ckpt.save(step, {"step": jnp.asarray(step, jnp.int32), "params": meta_params,
                         "opt_state": opt_state}, force=True)
      if end.stop:
        ckpt.close()
        writer.close()
        loop_lib.log_stop("meta-training", step, end)
        if end.interrupted:
          raise KeyboardInterrupt
        raise SystemExit(0)
  ckpt.close()
  writer.close()
  return meta_params
