"""Contrastive pretraining: train state, optimizer, the sharded train step.

One step, from batch to update:

  batch {'image': (B, H, W, C) f32, 'tokens': (B, L) i32}  (global arrays, batch-sharded)
  -> TwoTower.apply -> zimg, ztxt (B, E) -> contrastive loss (losses.py)
  -> grads -> optax (clip by global norm, AdamW with decay mask, warmup + cosine)
  -> new TrainState, metrics (device scalars; nothing is fetched inside the step)

Gradient accumulation (``config.grad_accum = k > 1``) is exact for contrastive losses:
the loss couples every pair in the batch, so summing micro-batch losses would change the
objective. Instead (the "gradient cache" scheme) the towers first embed the k
micro-batches without storing activations, the loss and its gradient with respect to
the embeddings are computed on the whole batch, and each micro-batch is then pushed
back through the towers with its slice of that gradient. Memory is that of one
micro-batch; the result equals one big-batch step.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fszjax import interrupt, losses, sharding
from fszjax.models.two_tower import TwoTower, build_model
from fszjax.tree import flatten, path_str


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


# ----------------------------------------------------------------------------- optimizer


def decay_mask(params):
  """True for weights that get weight decay: kernels and embeddings (not norms, biases,
  position embeddings, class tokens, probes, logit scale/bias)."""
  def one(path, _):
    last = path_str(path).split("/")[-1]
    return last in ("kernel", "embedding")
  return jax.tree_util.tree_map_with_path(one, params)


def frozen_labels(params, patterns) -> Any:
  """'frozen' for params whose path matches any regex in `patterns`, else 'trained'."""
  regs = [re.compile(p) for p in patterns]

  def one(path, _):
    s = path_str(path)
    return "frozen" if any(r.search(s) for r in regs) else "trained"
  return jax.tree_util.tree_map_with_path(one, params)


def make_schedule(ocfg, total_steps: int) -> optax.Schedule:
  warmup = int(ocfg.get("warmup_steps", 0))
  lr = float(ocfg.lr)
  kind = ocfg.get("schedule", "cosine")
  end = lr * float(ocfg.get("min_lr_ratio", 0.0))
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=max(warmup, 0), decay_steps=max(total_steps, warmup + 1),
        end_value=end)
  if kind == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup])
  raise ValueError(f"unknown config.optim.schedule {kind!r}; use 'cosine' or 'constant'")


def make_optimizer(ocfg, total_steps: int, freeze: tuple[str, ...] = ()):
  """AdamW (decay mask) after global-norm clipping, with a warmup + cosine schedule.

  Params matching a regex in `freeze` get zero updates (e.g. LiT's image tower).
  Returns ``(tx, schedule)``.
  """
  schedule = make_schedule(ocfg, total_steps)
  parts = []
  if ocfg.get("clip_norm", 0):
    parts.append(optax.clip_by_global_norm(float(ocfg.clip_norm)))
  parts.append(optax.adamw(
      schedule, b1=float(ocfg.get("b1", 0.9)), b2=float(ocfg.get("b2", 0.999)),
      eps=float(ocfg.get("eps", 1e-8)), weight_decay=float(ocfg.get("wd", 0.0)),
      mask=decay_mask))
  tx = optax.chain(*parts)
  if freeze:
    tx = optax.multi_transform(
        {"trained": tx, "frozen": optax.set_to_zero()},
        functools.partial(frozen_labels, patterns=tuple(freeze)))
  return tx, schedule


# ----------------------------------------------------------------------------- init


def input_shapes(config, batch: int = 1):
  d = config.data if "data" in config else None
  size = config.model.image.get("image_size", 0) or (d.image_size if d is not None else 224)
  channels = config.model.image.get("channels", 0) or (d.get("channels", 3) if d is not None else 3)
  return (batch, size, size, channels), (batch, config.model.text.max_len)


def _state_parts(config, model: TwoTower | None = None):
  model = model or build_model(config.model)
  tx, schedule = make_optimizer(config.optim, config.total_steps,
                                tuple(config.optim.get("freeze", ()) or ()))
  img_shape, tok_shape = input_shapes(config)

  def init_boxed(rng_data):
    rng = jax.random.wrap_key_data(rng_data)
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros(img_shape, jnp.float32),
                        jnp.zeros(tok_shape, jnp.int32))["params"]
    return params, jax.random.key_data(state_rng)

  return model, tx, schedule, init_boxed


def _seed_data(config):
  return jax.random.key_data(jax.random.key(config.seed))


def state_shardings(config, mesh: Mesh, rules, model: TwoTower | None = None):
  """Abstract TrainState (`ShapeDtypeStruct`s carrying their shardings on `mesh`).

  Used both to initialise in place and as the restore target of a checkpoint written on
  any other mesh. Nothing is materialised.
  """
  model, tx, _, init_boxed = _state_parts(config, model)
  abstract_boxed, abstract_rng = jax.eval_shape(init_boxed, _seed_data(config))
  param_sh = sharding.logical_to_sharding(nn.get_partition_spec(abstract_boxed), mesh, rules)
  abstract_params = jax.tree.map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
      nn.unbox(abstract_boxed), param_sh)
  with jax.set_mesh(mesh):
    opt_sh = jax.jit(tx.init).lower(abstract_params).compile().output_shardings
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  abstract_opt = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                              abstract_opt, opt_sh)
  rep = sharding.replicated(mesh)
  return TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=abstract_params,
      opt_state=abstract_opt,
      rng=jax.ShapeDtypeStruct(abstract_rng.shape, abstract_rng.dtype, sharding=rep))


def create_train_state(config, mesh: Mesh, rules, model: TwoTower | None = None):
  """Builds the model, optimizer and a sharded TrainState, initialised in place (no device
  ever holds more than its shards). Returns ``(state, model, tx, schedule)``.

  The state's ``rng`` is raw key data (uint32), which checkpoints portably.
  """
  model, tx, schedule, init_boxed = _state_parts(config, model)
  abstract = state_shardings(config, mesh, rules, model)
  shardings = sharding.shardings_of(abstract)

  def init(rng_data):
    boxed, state_rng = init_boxed(rng_data)
    params = nn.unbox(boxed)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=state_rng)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(init, out_shardings=shardings)(_seed_data(config))
  return state, model, tx, schedule


# ----------------------------------------------------------------------------- step


def _to_micro(x, k: int):
  """(B, ...) -> (k, B/k, ...): micro-batch m takes rows m, m+k, m+2k, ... so each
  micro-batch keeps the batch sharding (every device keeps its own rows)."""
  b = x.shape[0]
  return jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)


def _from_micro(x):
  """Inverse of `_to_micro`: (k, B/k, ...) -> (B, ...)."""
  k, bk = x.shape[:2]
  return jnp.swapaxes(x, 0, 1).reshape((k * bk,) + x.shape[2:])


def in_batch_accuracy(zimg, ztxt, mesh: Mesh | None):
  """Fraction of images whose most similar text in the batch is their own (i2t top-1).

  Each device scores only its own image rows against the gathered texts, ``(b, B)``.
  """
  if mesh is None:
    sims = zimg @ ztxt.T
    return jnp.mean(jnp.argmax(sims, axis=1) == jnp.arange(zimg.shape[0]))
  axes = tuple(a for a in sharding.BATCH_AXES if a in mesh.shape)

  def per_device(zi, zt):
    zt_all = jax.lax.all_gather(zt, axes, tiled=True)
    b = zi.shape[0]
    offset = jax.lax.axis_index(axes) * b
    hits = jnp.argmax(zi @ zt_all.T, axis=1) == offset + jnp.arange(b)
    return jax.lax.psum(hits.sum(), axes) / zimg.shape[0]

  spec = P(axes)
  return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec), out_specs=P())(zimg, ztxt)


def make_train_step(model: TwoTower, tx, schedule, config, mesh: Mesh | None, rules=None,
                    jit: bool = True, state_shardings=None):
  """Returns ``step(state, batch) -> (state, metrics)``; jitted with donated state if `jit`."""
  kind = config.loss
  chunked = bool(config.get("loss_chunked", True)) and mesh is not None
  accum = int(config.get("grad_accum", 1))
  rules = rules if rules is not None else sharding.DEFAULT_RULES

  def loss_of(zi, zt, t, b):
    return losses.contrastive_loss(kind, zi, zt, t, b, mesh=mesh, chunked=chunked)

  def embed(params, images, tokens):
    zi, zt, _ = model.apply({"params": params}, images, tokens)
    return zi, zt

  def scale_bias(params):
    return model.apply({"params": params}, method=TwoTower.scale_and_bias)

  def grads_and_metrics(params, batch):
    images, tokens = batch["image"], batch["tokens"]
    if accum <= 1:
      def full_loss(p):
        zi, zt = embed(p, images, tokens)
        t, b = scale_bias(p)
        return loss_of(zi, zt, t, b), (zi, zt)
      (loss, (zi, zt)), grads = jax.value_and_grad(full_loss, has_aux=True)(params)
      return loss, grads, zi, zt
    if images.shape[0] % accum:
      raise ValueError(f"batch {images.shape[0]} not divisible by grad_accum {accum}")
    img_mb, tok_mb = _to_micro(images, accum), _to_micro(tokens, accum)
    # 1) embeddings of all micro-batches, no activations kept.
    zi_mb, zt_mb = jax.lax.map(lambda xs: embed(params, *xs), (img_mb, tok_mb))
    zi, zt = _from_micro(zi_mb), _from_micro(zt_mb)
    # 2) the loss on the whole batch and its gradient w.r.t. the embeddings.
    (t, b), vjp_tb = jax.vjp(scale_bias, params)
    loss, (gzi, gzt, gt, gb) = jax.value_and_grad(
        loss_of, argnums=(0, 1, 2, 3))(zi, zt, t, b)
    grads = vjp_tb((gt, gb))[0]
    # 3) back through the towers one micro-batch at a time.
    gzi_mb, gzt_mb = _to_micro(gzi, accum), _to_micro(gzt, accum)

    def body(acc, xs):
      img, tok, gi, gtx = xs
      _, vjp = jax.vjp(lambda p: embed(p, img, tok), params)
      g = vjp((gi, gtx))[0]
      return jax.tree.map(jnp.add, acc, g), None

    grads, _ = jax.lax.scan(body, grads, (img_mb, tok_mb, gzi_mb, gzt_mb))
    return loss, grads, zi, zt

  def step(state: TrainState, batch):
    with nn.logical_axis_rules(rules):
      loss, grads, zi, zt = grads_and_metrics(state.params, batch)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      t, b = scale_bias(state.params)
      metrics = {
          "loss": loss,
          "lr": schedule(state.step),
          "grad_norm": optax.tree.norm(grads),
          "param_norm": optax.tree.norm(state.params),
          "logit_scale": jnp.exp(t),
          "i2t_acc": in_batch_accuracy(zi, zt, mesh),
      }
      if b is not None:
        metrics["logit_bias"] = b
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              rng=jax.random.key_data(jax.random.fold_in(
                                  jax.random.wrap_key_data(state.rng), state.step)))
    return new_state, metrics

  if not jit:
    return step
  batch_sh = None
  if mesh is not None:
    batch_sh = {"image": sharding.batch_sharding(mesh, 4), "tokens": sharding.batch_sharding(mesh, 2)}
  jitted = jax.jit(step, in_shardings=(state_shardings, batch_sh),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))
  if mesh is None:
    return jitted

  def run(state, batch):
    batch = {"image": batch["image"], "tokens": batch["tokens"]}
    with jax.set_mesh(mesh):
      return jitted(state, batch)
  run.jitted = jitted  # type: ignore[attr-defined]
  return run


# ----------------------------------------------------------------------------- the loop


class TrainingDiverged(RuntimeError):
  """The loss became NaN/inf; the last good checkpoint is kept."""

  user_error = True


def init_params_from(state: TrainState, path: str, keys: str = "") -> tuple[TrainState, int]:
  """Copies params from another run's checkpoint into `state` (all, or those whose path
  matches the regex `keys`, e.g. ``^img/`` for LiT). Shapes must agree."""
  import numpy as np

  from fszjax import checkpoint

  src = checkpoint.load_params_numpy(path)
  src_flat = flatten(src)
  reg = re.compile(keys) if keys else None
  copied = 0
  missing: list[str] = []

  def one(p, x):
    nonlocal copied
    name = path_str(p)
    if reg is not None and not reg.search(name):
      return x
    if name not in src_flat:
      if reg is not None:
        raise checkpoint.CheckpointError(
            f"init_from {path}: parameter {name} is missing there; adjust config.init_keys")
      missing.append(name)
      return x
    v = np.asarray(src_flat[name])
    if v.shape != x.shape:
      raise checkpoint.CheckpointError(
          f"init_from {path}: {name} has shape {v.shape} there but {x.shape} here; the "
          "towers' configs must match")
    copied += 1
    return jax.device_put(v.astype(x.dtype), x.sharding)

  params = jax.tree_util.tree_map_with_path(one, state.params)
  if copied == 0:
    raise checkpoint.CheckpointError(f"init_from {path}: no parameter matched {keys or 'any'}; "
                                     "check config.model.scan_layers matches the source")
  if missing:
    import logging

    logging.getLogger("fszjax").warning(
        "init_from %s: %d parameter arrays are not in the source and keep their initial "
        "values (first: %s); a scanned vs per-block layout mismatch shows up this way",
        path, len(missing), missing[0])
  return state.replace(params=params), copied


def _finite_or_raise(loss: float, step: int, ckpt) -> None:
  import math

  if not math.isfinite(loss):
    last = ckpt.latest_step() if ckpt is not None else None
    kept = f"the last good checkpoint (step {last}) is kept" if last else "no checkpoint was written"
    raise TrainingDiverged(f"loss is {loss} at step {step}; {kept}; lower config.optim.lr or "
                           "raise config.optim.warmup_steps")


def train(config, workdir: str, *, stop_at: int | None = None) -> dict:
  """Runs (or resumes) pretraining in `workdir`. Returns the summary dict.

  ``stop_at`` ends the run after that step as if preempted (tests of exact resume).
  """
  import json
  import logging
  import os
  import time

  from fszjax import checkpoint, evaluate, metrics as metrics_lib
  from fszjax import config as config_lib
  from fszjax.data import pipeline

  log = logging.getLogger("fszjax")
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.mesh_from_config(config.mesh)
  rules = sharding.rules_from_config(config)
  sharding.check_global_batch(config.batch_size, mesh)
  if config.get("init_from", "") and not os.path.exists(os.path.expanduser(config.init_from)):
    raise checkpoint.CheckpointError(
        f"config.init_from={config.init_from} does not exist; pass a fszjax workdir or checkpoint")
  if is_main:
    config_lib.save_config(config, os.path.join(workdir, "config.json"))

  state, model, tx, schedule = create_train_state(config, mesh, rules)
  state_sh = sharding.shardings_of(state)
  train_iter = pipeline.make_train_iterator(config.data, global_batch=config.batch_size,
                                            seed=config.seed)
  ccfg = config.checkpoint
  ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"), save_every=ccfg.save_every, keep=ccfg.keep,
      best_metric=ccfg.get("best_metric", None) or None, best_mode=ccfg.get("best_mode", "max"),
      async_save=ccfg.get("async_save", True))
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  start = 0
  if ckpt.all_steps():
    abstract = state_shardings(config, mesh, rules, model)
    start, state = ckpt.restore(abstract, iterator=train_iter)
    writer.truncate_after(start)
    if is_main:
      log.info("resumed from step %d", start)
  elif config.get("init_from", ""):
    state, n = init_params_from(state, config.init_from, config.get("init_keys", ""))
    if is_main:
      log.info("initialised %d parameter arrays from %s", n, config.init_from)
  # JAX's preemption sync point is 1 + the last step any process reported: report the
  # start now, so a SIGTERM during the first (compiling) step of a resumed run still stops.
  ckpt.reached_preemption(start)

  step_fn = make_train_step(model, tx, schedule, config, mesh, rules, state_shardings=state_sh)
  total = int(config.total_steps)
  log_every, eval_every = int(config.log_every), int(config.get("eval_every", 0) or 0)
  tokenizer = pipeline.get_tokenizer(config.data)
  if tokenizer.vocab_size > config.model.text.vocab_size:
    raise config_lib.ConfigError(
        f"the tokenizer has {tokenizer.vocab_size} ids but config.model.text.vocab_size="
        f"{config.model.text.vocab_size}; set it to {tokenizer.vocab_size}")
  eval_cache: dict = {}

  def run_eval():
    with jax.set_mesh(mesh):
      return evaluate.run_evaluators(config, model, state.params, tokenizer, arrays_cache=eval_cache)

  progress = metrics_lib.Progress(total, start, enabled=is_main and config.get("progress", True))
  t_last, steps_since = time.perf_counter(), 0
  t_start = time.perf_counter()
  last_eval = None
  metrics = None
  step = start
  stopped_early = interrupted = False
  try:
    with interrupt.StopRequest("pretraining") as stop_request:
      for step in range(start + 1, total + 1):
        batch = next(train_iter)
        gbatch = sharding.host_to_global(
            {"image": batch["image"], "tokens": batch["tokens"]}, mesh, config.batch_size)
        state, metrics = step_fn(state, gbatch)
        steps_since += 1
        progress.update(1)
        row = None
        if step % log_every == 0 or step == total:
          host = jax.device_get(metrics)
          _finite_or_raise(float(host["loss"]), step, ckpt)
          now = time.perf_counter()
          row = {k: float(v) for k, v in host.items()}
          row["examples_per_sec"] = steps_since * config.batch_size / (now - t_last)
          t_last, steps_since = now, 0
          progress.update(0, loss=row["loss"])
          if is_main and not config.get("progress", True):
            log.info("step %d/%d loss %.4f i2t_acc %.3f lr %.2e %.1f ex/s", step, total,
                     row["loss"], row["i2t_acc"], row["lr"], row["examples_per_sec"])
        eval_metrics = None
        if eval_every and (step % eval_every == 0 or step == total):
          evals = run_eval()
          last_eval = evals
          eval_metrics = metrics_lib.flatten_eval(evals)
          row = (row or {}) | eval_metrics
          t_last = time.perf_counter()  # evaluation time is not training throughput
        if row is not None:
          writer.write(step, row)
        preempted = ckpt.reached_preemption(step)
        interrupted = stop_request.requested
        stop_now = (stop_at is not None and step >= stop_at) or interrupted
        if ckpt.should_save(step) or step == total or preempted or stop_now:
          _finite_or_raise(float(jax.device_get(metrics["loss"])), step, ckpt)
          ckpt.save(step, state, train_iter, config, metrics=eval_metrics, force=True)
        if preempted or stop_now:
          stopped_early = True
          if is_main:
            log.warning("stopping at step %d (%s); rerun the same command to resume", step,
                        "preemption" if preempted else "Ctrl-C" if interrupted else "stop_at")
          break
  finally:
    ckpt.wait()
    progress.close()
  if interrupted:
    ckpt.close()
    writer.close()
    raise KeyboardInterrupt
  wall = time.perf_counter() - t_start
  summary = {"steps": int(step), "stopped_early": stopped_early}
  if not stopped_early:
    if last_eval is None:
      last_eval = run_eval()
    summary.update(last_eval)
    summary["wall_time_s"] = wall
    summary["resumed_from"] = start
    if is_main:
      with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
      metrics_lib.plot_report(os.path.join(workdir, "metrics.jsonl"),
                              os.path.join(workdir, "report.png"),
                              title=f"{config.get('name', '')} ({config.loss})")
  ckpt.close()
  writer.close()
  return summary
