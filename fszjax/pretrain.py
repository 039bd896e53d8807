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

from fszjax import checkpoint, interrupt, losses, sharding
from fszjax import workdir as workdir_lib
from fszjax.errors import UserError
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


def abstract_train_state(config, mesh: Mesh, rules, model: TwoTower | None = None):
  """Abstract TrainState: `ShapeDtypeStruct`s carrying their shardings on `mesh`.

  Parameters are sharded by their logical axes through `rules`; every optimizer-state
  leaf that mirrors a parameter (Adam's moments) is sharded like that parameter, and
  counters are replicated (`sharding.optimizer_state_shardings`). Used both to
  initialise in place and as the restore target of a checkpoint written on any other
  mesh or with any other layout (e.g. the replicated optimizer state of older
  checkpoints). Nothing is materialised.
  """
  model, tx, _, init_boxed = _state_parts(config, model)
  abstract_boxed, abstract_rng = jax.eval_shape(init_boxed, _seed_data(config))
  param_sh = sharding.logical_to_sharding(nn.get_partition_spec(abstract_boxed), mesh, rules)
  abstract_params = jax.tree.map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
      nn.unbox(abstract_boxed), param_sh)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sh = sharding.optimizer_state_shardings(tx, abstract_opt, abstract_params, mesh)
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
  abstract = abstract_train_state(config, mesh, rules, model)
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


def make_loss_and_grads(model: TwoTower, config, mesh: Mesh | None):
  """Returns ``loss_and_grads(params, batch) -> (loss, grads, zimg, ztxt)``: the train
  step's loss and its gradient with respect to the parameters, unjitted (call it inside
  the mesh and the logical-axis rules). With ``config.grad_accum = k > 1`` the gradient
  cache scheme described at the top of this module is used."""
  kind = config.loss
  chunked = bool(config.get("loss_chunked", True)) and mesh is not None
  accum = int(config.get("grad_accum", 1))

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

  return grads_and_metrics


def make_train_step(model: TwoTower, tx, schedule, config, mesh: Mesh | None, rules=None,
                    jit: bool = True, state_shardings=None):
  """Returns ``step(state, batch) -> (state, metrics)``; jitted with donated state if `jit`.

  Under a mesh the gradients are constrained to the parameters' shardings (so that with
  FSDP each device keeps only its shard of the reduced gradient, and the optimizer,
  whose state is sharded like the parameters, updates only that shard).
  """
  rules = rules if rules is not None else sharding.DEFAULT_RULES
  param_shardings = state_shardings.params if (mesh is not None and state_shardings is not None) else None
  grads_and_metrics = make_loss_and_grads(model, config, mesh)

  def scale_bias(params):
    return model.apply({"params": params}, method=TwoTower.scale_and_bias)

  def step(state: TrainState, batch):
    with nn.logical_axis_rules(rules):
      loss, grads, zi, zt = grads_and_metrics(state.params, batch)
      if param_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      t, b = scale_bias(state.params)
      metrics = {
          "loss": loss,
          "lr": schedule(state.step),
          "grad_norm": optax.tree.norm(grads),
          # The updated params: a norm of the donated input params would make XLA keep a
          # copy of every parameter alive next to the update (measured: 77 vs 26 MB/step).
          "param_norm": optax.tree.norm(params),
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


class TrainingDiverged(UserError):
  """The loss spiked or became NaN/inf; checkpoints written after the last good loss are
  moved aside and the message names the step a rerun resumes from."""

  def __init__(self, message: str, loss: float = float("nan"), step: int = 0):
    super().__init__(message)
    self.loss, self.step = loss, step


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


class LossMonitor:
  """Divergence detection on the losses the loop fetches (log and save steps).

  A loss *spikes* when it is NaN/inf, or when it exceeds ``factor`` times the median of
  the last ``window`` good losses and that median by more than ``min_jump`` (so a run
  whose loss is near zero does not trip on noise). ``last_ok`` is the latest step whose
  loss was good: the loss of step s is computed with the params of checkpoint s - 1, so
  checkpoints at ``last_ok`` and later are not known to be good once a spike is seen.
  """

  def __init__(self, factor: float = 10.0, window: int = 20, min_jump: float = 1.0,
               start: int = 0, history=()):
    self.factor, self.window, self.min_jump = float(factor), int(window), float(min_jump)
    self.history = [float(x) for x in history][-self.window:]
    self.last_ok = start

  def median(self) -> float | None:
    import statistics

    return statistics.median(self.history) if self.history else None

  def check(self, loss: float, step: int) -> None:
    import math

    med = self.median()
    if not math.isfinite(loss):
      raise TrainingDiverged(f"loss is {loss} at step {step}", loss, step)
    if (self.factor > 0 and med is not None and loss > self.factor * med
        and loss - med > self.min_jump):
      raise TrainingDiverged(f"loss is {loss:.4g} at step {step}, more than "
                             f"{self.factor:g}x the median {med:.4g} of the recent losses", loss, step)
    self.history = (self.history + [loss])[-self.window:]
    self.last_ok = max(self.last_ok, step)


def throughput_fields(config, mesh: Mesh, steps: int, seconds: float,
                      peak_tflops: float | None = None) -> dict:
  """``model_tflops_per_device``: the analytic model FLOPs of `steps` train steps
  (`flops.train_flops_per_step`, recomputation not counted) per device per second, and
  ``mfu`` (that over the chip's peak dense bf16 TFLOP/s) where the peak is known: given,
  or from the device kind on an accelerator (none on the CPU)."""
  from fszjax import flops

  per_step = flops.train_flops_per_step(config.model, int(config.batch_size)) / 1e12
  achieved = per_step * steps / max(seconds, 1e-9) / mesh.devices.size
  out = {"model_tflops_per_device": achieved}
  if peak_tflops is None and jax.default_backend() != "cpu":
    peak_tflops = flops.peak_tflops(mesh.devices.flat[0].device_kind)
  if peak_tflops:
    out["mfu"] = achieved / peak_tflops
  return out


def _finite_or_raise(loss: float, step: int, monitor: LossMonitor) -> None:
  """Raises `TrainingDiverged` if `loss` (of `step`) is non-finite or a spike."""
  monitor.check(loss, step)


def _diverged(e: TrainingDiverged, ckpt, monitor: LossMonitor, lr: float) -> TrainingDiverged:
  """Moves the checkpoints from ``monitor.last_ok`` on aside and says how to continue."""
  ckpt.wait()
  suspect = [s for s in ckpt.all_steps() if s >= monitor.last_ok]
  moved = ckpt.set_aside(suspect, "diverged") if suspect else []
  good = ckpt.latest_step()
  aside = (f"checkpoint step(s) {suspect} (written after the last good loss, step "
           f"{monitor.last_ok}) moved aside to {moved[0]}{' ...' if len(moved) > 1 else ''}; "
           if moved else "")
  if good is not None:
    how = (f"rerunning the same command resumes from step {good} (the last checkpoint from "
           f"before the blow-up), and a changed --config.optim.lr (e.g. {lr / 10:g}) or a longer "
           "--config.optim.warmup_steps takes effect from there; or pass --fresh to start over")
  else:
    how = ("no checkpoint predates the blow-up, so rerunning starts over from step 0: lower "
           f"--config.optim.lr (e.g. {lr / 10:g}) or raise --config.optim.warmup_steps")
  return TrainingDiverged(f"{e}: training diverged; {aside}{how}", e.loss, e.step)


def train(config, workdir: str, *, stop_at: int | None = None) -> dict:
  """Runs (or resumes) pretraining in `workdir`. Returns the summary dict.

  ``stop_at`` ends the run after that step as if preempted (tests of exact resume).
  One run at a time writes a workdir: a second one refuses with one line
  (`fszjax.workdir.WorkdirLock`, taken by process 0, released by the OS if it dies).
  """
  with workdir_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0):
    return _train(config, workdir, stop_at=stop_at)


def _check_inputs(config) -> None:
  """Fail fast: the ``init_from`` checkpoint and every dataset split the config names
  (training and evaluation) are checked before the model is built."""
  from fszjax.data import sources

  src = config.get("init_from", "")
  if src:
    try:
      checkpoint.step_dirs(src)
    except checkpoint.CheckpointError as e:
      raise checkpoint.CheckpointError(f"config.init_from={src}: {e}") from None
  ecfg = config.get("eval", None)
  splits = list(ecfg.get("splits", ()) if ecfg is not None else ()) or list(
      config.data.get("eval_splits", ()) or ())
  if splits:  # the final evaluation always runs
    comp = sources.single_component(config.data)
    for split in splits:
      sources.open_split(comp, split)


def _train(config, workdir: str, *, stop_at: int | None = None) -> dict:
  """`train` with the workdir lock held."""
  import json
  import logging
  import os
  import time

  from fszjax import checkpoint, evaluate, metrics as metrics_lib
  from fszjax import config as config_lib
  from fszjax.data import pipeline, vocab

  log = logging.getLogger("fszjax")
  is_main = jax.process_index() == 0
  # ---- fail fast: everything the config names is checked before the model is built.
  workdir_lib.make(workdir)
  if is_main:
    workdir_lib.check_writable(workdir)
  mesh = sharding.mesh_from_config(config.mesh)
  rules = sharding.rules_from_config(config)
  sharding.check_global_batch(config.batch_size, mesh)
  _check_inputs(config)
  train_iter = pipeline.make_train_iterator(config.data, global_batch=config.batch_size,
                                            seed=config.seed)
  tokenizer = vocab.get_tokenizer(config.data)
  if tokenizer.vocab_size > config.model.text.vocab_size:
    raise config_lib.ConfigError(
        f"the tokenizer has {tokenizer.vocab_size} ids but config.model.text.vocab_size="
        f"{config.model.text.vocab_size}; set it to {tokenizer.vocab_size}")
  if is_main:  # the tokenizer travels with the workdir: config.json points at its copy
    from fszjax import text as tokenizer_lib

    saved = config.copy_and_resolve_references()
    with saved.data.tokenizer.ignore_type():
      saved.data.tokenizer.path = tokenizer_lib.copy_to_workdir(
          vocab.get_tokenizer(config.data), workdir)
    config_lib.save_config(saved, os.path.join(workdir, "config.json"))

  state, model, tx, schedule = create_train_state(config, mesh, rules)
  state_sh = sharding.shardings_of(state)
  ccfg = config.checkpoint
  ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"), save_every=ccfg.save_every, keep=ccfg.keep,
      best_metric=ccfg.get("best_metric", None) or None, best_mode=ccfg.get("best_mode", "max"),
      async_save=ccfg.get("async_save", True), on_save_error=ccfg.get("on_save_error", "stop"))
  ckpt.state_bytes = checkpoint.tree_nbytes(state)
  if is_main:  # room for two checkpoints (the keep policy never holds fewer)
    workdir_lib.check_free_space(ckpt.directory, 2 * ckpt.state_bytes,
                                 "two checkpoints of this run")
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  start = 0
  if ckpt.all_steps():
    abstract = abstract_train_state(config, mesh, rules, model)
    start, state = ckpt.restore(abstract, iterator=train_iter)
    if is_main:
      log.info("resumed from step %d", start)
  elif config.get("init_from", ""):
    state, n = init_params_from(state, config.init_from, config.get("init_keys", ""))
    if is_main:
      log.info("initialised %d parameter arrays from %s", n, config.init_from)
  writer.truncate_after(start)  # rows a crashed or diverged run logged past `start`
  history = [r["loss"] for r in metrics_lib.read_jsonl(writer.path)
             if "loss" in r and r.get("step", 0) <= start] if jax.process_count() == 1 and start else []
  monitor = LossMonitor(float(ccfg.get("spike_factor", 10.0)), start=start, history=history)
  # JAX's preemption sync point is 1 + the last step any process reported: report the
  # start now, so a SIGTERM during the first (compiling) step of a resumed run still stops.
  ckpt.reached_preemption(start)

  step_fn = make_train_step(model, tx, schedule, config, mesh, rules, state_shardings=state_sh)
  total = int(config.total_steps)
  log_every, eval_every = int(config.log_every), int(config.get("eval_every", 0) or 0)
  eval_cache: dict = {}

  def run_eval():
    with jax.set_mesh(mesh):
      with metrics_lib.timed(f"zero-shot evaluation at step {int(state.step)}", log,
                             enabled=is_main):
        return evaluate.run_evaluators(config, model, state.params, tokenizer,
                                       arrays_cache=eval_cache)

  # A bar on a terminal; otherwise the step lines below (with ETA) and one closing line.
  progress = metrics_lib.Progress(total, start, enabled=is_main and config.get("progress", True),
                                  every_s=float("inf"))
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
          _finite_or_raise(float(host["loss"]), step, monitor)
          now = time.perf_counter()
          row = {k: float(v) for k, v in host.items()}
          row["examples_per_sec"] = steps_since * config.batch_size / (now - t_last)
          row.update(throughput_fields(config, mesh, steps_since, now - t_last))
          t_last, steps_since = now, 0
          progress.update(0, loss=row["loss"])
          if is_main and progress.bar is None:  # no bar (off, or not a terminal): a log line
            log.info("step %d/%d loss %.4f i2t_acc %.3f lr %.2e %.1f ex/s, ETA %s", step, total,
                     row["loss"], row["i2t_acc"], row["lr"], row["examples_per_sec"],
                     metrics_lib.eta(step - start, total - start, now - t_start))
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
          # Never save while the loss spikes: the checkpoint would be kept as "good".
          _finite_or_raise(float(jax.device_get(metrics["loss"])), step, monitor)
          ckpt.save(step, state, train_iter, config, metrics=eval_metrics, force=True)
        if preempted or stop_now:
          stopped_early = True
          if is_main:
            log.warning("stopping at step %d (%s); rerun the same command to resume", step,
                        "preemption" if preempted else "Ctrl-C" if interrupted else "stop_at")
          break
  except TrainingDiverged as e:
    progress.close()
    raise _diverged(e, ckpt, monitor, float(config.optim.lr)) from None
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
