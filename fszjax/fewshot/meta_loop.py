"""The meta-training of `fszjax adapt` (Conv-4 from scratch and the image tower): the
outer optimizer, device sharing of the meta-batch, and `meta_train`, a job of the shared
training loop (`fszjax.loop`: Orbax checkpoints, exact resume, preemption, Ctrl-C, NaN and
spike handling, metrics and progress)."""

from __future__ import annotations

import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fszjax import loop as loop_lib
from fszjax import sharding
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
  schedule = m.outer_schedule
  if schedule == "cosine":
    total = max(int(m.steps), 1)
    warmup = min(int(m.warmup_steps), total - 1)
    lr = optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, total, 0.0)
  elif schedule != "constant":
    raise AdaptError(f"config.fewshot.meta.outer_schedule={schedule!r}: use 'constant' or 'cosine'")
  return optax.sgd(lr) if m.algorithm == "reptile" else optax.adam(lr)


def local_devices(m) -> int:
  """Devices that share the meta-batch and the evaluation episodes: this process's devices
  (``fewshot.meta.devices``: 0 = all, else at most that many). With several processes each
  runs the whole (identical) work on one device."""
  n = jax.local_device_count() if jax.process_count() == 1 else 1
  want = int(m.devices or 0)
  return min(n, want) if want else n


def _meta_mesh(m):
  """The mesh that shares the meta-batch over this process's devices, or None (one)."""
  ndev = local_devices(m)
  if ndev > 1 and int(m.meta_batch) % ndev == 0:
    log.info("meta-batch of %d tasks sharded over %d devices", int(m.meta_batch), ndev)
    return sharding.make_mesh(ndev, 1, 1, devices=jax.local_devices()[:ndev])
  if ndev > 1:
    log.warning("meta_batch=%d is not a multiple of the %d devices: meta-training on one",
                int(m.meta_batch), ndev)
  return None


def meta_train(config, ckpt_dir: str, features_fn, mcfg: meta_lib.MetaConfig, meta_params,
               sample: Callable[[int], dict]):
  """Meta-trains ``config.fewshot.meta.steps`` steps on ``sample(step)`` meta-batches in the
  shared training loop (`fszjax.loop`), with Orbax checkpoints in `ckpt_dir`, exact resume
  (batches are drawn by step index) and metrics in the directory above it; on preemption
  (SIGTERM) it saves and exits 0, on Ctrl-C it saves and raises `KeyboardInterrupt`, on a
  NaN or spiking loss it sets the suspect checkpoints aside and raises
  `loop.TrainingDiverged` naming the step a rerun resumes from. Returns the meta-params."""
  m = config.fewshot.meta
  if config.checkpoint.best_metric:  # the meta job has no periodic evaluation to rank by
    raise AdaptError(f"config.checkpoint.best_metric={config.checkpoint.best_metric!r}: "
                     "meta-training has no evaluation metric to keep the best checkpoint "
                     "by; drop that setting (leave it empty)")
  opt = outer_optimizer(m)
  mesh = _meta_mesh(m)
  step_fn = meta_lib.make_meta_step(features_fn, mcfg, opt, mesh=mesh, donate=False)
  train = loop_lib.TrainLoop(
      "meta-training", ckpt_dir, os.path.dirname(os.path.abspath(ckpt_dir)), config.checkpoint,
      loop_lib.LrHint(float(m.outer_lr), lr_key="fewshot.meta.outer_lr", warmup_key=None),
      progress=config.progress, desc="meta-train")
  state = {"step": jnp.zeros((), jnp.int32), "params": meta_params,
           "opt_state": opt.init(meta_params)}
  _, state = train.restore(
      state, lambda: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
  tasks = int(m.meta_batch)

  def step(st, i):
    params, opt_state, metrics = step_fn(st["params"], st["opt_state"], sample(i))
    return {"step": jnp.asarray(i, jnp.int32), "params": params, "opt_state": opt_state}, metrics

  def log_row(s: loop_lib.LogStep):
    rate = s.done * tasks / s.elapsed
    line = (f"meta step {s.step}/{s.total} loss {s.host['loss']:.4f} query acc "
            f"{s.host['acc']:.3f} {rate:.1f} tasks/s")
    return {**s.host, "tasks_per_sec": rate}, line

  out = train.run(state, loop_lib.Job(step=step, log_row=log_row, total=int(m.steps),
                                      log_every=int(config.log_every)))
  if out.stopped:  # preempted: the checkpoint is saved, the job ends cleanly
    raise SystemExit(0)
  return out.state["params"]
