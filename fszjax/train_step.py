"""The contrastive train step: loss and gradients (with exact micro-batching), the
jitted, sharded update and its metrics.

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

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, PartitionSpec as P

from fszjax import losses, sharding
from fszjax.models.two_tower import TwoTower
from fszjax.train_state import TrainState


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
  chunked = bool(config.loss_chunked) and mesh is not None
  accum = int(config.grad_accum)

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
                    state_shardings=None):
  """Returns ``step(state, batch) -> (state, metrics)``, jitted with the state donated.

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
          # The norm of the step's input params. It makes XLA keep a copy of the donated
          # params next to the update (77 vs 26 MB/step on the issue-17 CPU setting), but
          # taking it of the updated params instead made an 8-device CPU run with a
          # diverged (inf) update hang in an all-gather rendezvous (tests/test_faults.py).
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
