"""Contrastive losses: CLIP (softmax) and SigLIP (sigmoid), dense and sharded.

Shapes: ``zimg, ztxt (B, E)`` L2-normalised embeddings where row ``i`` of each is a
matching pair; ``log_scale`` is the learned temperature in log form (scalar) and
``bias`` the SigLIP logit bias (scalar). Every loss returns a scalar: the mean over
the global batch.

Dense versions materialise the ``(B, B)`` logits and are the test references.

`siglip_loss_chunked` is a `jax.shard_map` ring over the batch mesh axes: each device
keeps its image rows, text chunks travel around the ring with `ppermute`, and every
device computes only ``(b, b)`` blocks (``b = B / devices``). Its backward pass is a
custom VJP that replays the ring (recomputing each block, as `jax.checkpoint` would)
with each text chunk's gradient travelling along with it and arriving home after the
last hop. Nothing of size ``B x B`` or ``n_devices x b x E`` is ever stored, so the
per-device memory is independent of the number of data-parallel devices.

`clip_loss_chunked` is the same ring for the softmax loss: the image rows' log-sum-exp
accumulates on their device block by block, the text columns' travels with the text
chunk; the backward pass replays the ring with the two ``(b,)`` normalisers saved. No
all-gather of the embeddings (open_clip's ``gather_with_grad`` holds ``B x E`` and
``(b, B)`` logits per device), so its per-device memory is flat in the device count too.
"""

from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from fszjax.config import LOSSES  # the loss names, defined in the base layer
from fszjax.sharding import BATCH_AXES


def _logits(zimg, ztxt, log_scale, bias=None):
  logits = jnp.exp(log_scale) * jnp.einsum(
      "id,jd->ij", zimg.astype(jnp.float32), ztxt.astype(jnp.float32))
  if bias is not None:
    logits = logits + bias
  return logits


def clip_loss_dense(zimg, ztxt, log_scale):
  """CLIP softmax loss, mean of image->text and text->image cross-entropies."""
  logits = _logits(zimg, ztxt, log_scale)
  diag = jnp.diagonal(logits)
  i2t = jax.nn.logsumexp(logits, axis=1) - diag
  t2i = jax.nn.logsumexp(logits, axis=0) - diag
  return 0.5 * (i2t.mean() + t2i.mean())


def siglip_loss_dense(zimg, ztxt, log_scale, bias):
  """SigLIP sigmoid loss: ``-sum_ij log sigmoid(y_ij * logit_ij) / B``, ``y = 2I - 1``."""
  logits = _logits(zimg, ztxt, log_scale, bias)
  labels = 2.0 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


def _siglip_block(zi, zt, log_scale, bias, positive):
  """Sum of the sigmoid loss over one ``(b, b)`` block; diagonal positive iff `positive`."""
  logits = _logits(zi, zt, log_scale, bias)
  eye = jnp.eye(logits.shape[0], logits.shape[1], dtype=logits.dtype)
  labels = jnp.where(positive, 2.0 * eye - 1.0, -jnp.ones_like(logits))
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


def _make_siglip_ring(axes: tuple[str, ...], n: int):
  """The per-device ring loss (a partial sum) with its memory-lean custom VJP."""
  perm = [(i, (i + 1) % n) for i in range(n)]

  def shift(x):
    return jax.lax.ppermute(x, axes, perm) if n > 1 else x

  def forward(zi, zt, log_scale, bias):
    def body(carry, k):
      ztc, acc = carry
      acc = acc + _siglip_block(zi, ztc, log_scale, bias, k == 0)
      return (shift(ztc), acc), None

    acc0 = jnp.zeros((), jnp.float32)
    acc0 = jax.lax.pcast(acc0, axes, to="varying") if axes else acc0
    (_, acc), _ = jax.lax.scan(body, (zt, acc0), jnp.arange(n))
    return acc

  @jax.custom_vjp
  def ring(zi, zt, log_scale, bias):
    return forward(zi, zt, log_scale, bias)

  def ring_fwd(zi, zt, log_scale, bias):
    return forward(zi, zt, log_scale, bias), (zi, zt, log_scale, bias)

  def ring_bwd(res, g):
    zi, zt, log_scale, bias = res

    def body(carry, k):
      ztc, gztc, gzi, gt, gb = carry
      _, vjp = jax.vjp(lambda a, c, t, b: _siglip_block(a, c, t, b, k == 0),
                       zi, ztc, log_scale, bias)
      dzi, dztc, dt, db = vjp(g)
      carry = (shift(ztc), shift(gztc + dztc), gzi + dzi, gt + dt, gb + db)
      return carry, None

    init = (zt, jnp.zeros_like(zt), jnp.zeros_like(zi), jnp.zeros_like(log_scale),
            jnp.zeros_like(bias))
    (_, gzt, gzi, gt, gb), _ = jax.lax.scan(body, init, jnp.arange(n))
    return gzi, gzt, gt, gb

  ring.defvjp(ring_fwd, ring_bwd)
  return ring


def _batch_axes(mesh: Mesh, axes: Sequence[str]) -> tuple[tuple[str, ...], int]:
  axes = tuple(a for a in axes if a in mesh.shape)
  n = 1
  for a in axes:
    n *= mesh.shape[a]
  return axes, n


def siglip_loss_chunked(zimg, ztxt, log_scale, bias, mesh: Mesh,
                        axes: Sequence[str] = BATCH_AXES):
  """SigLIP loss as a ppermute ring over the mesh's batch axes (see module docstring)."""
  axes, n = _batch_axes(mesh, axes)
  if zimg.shape[0] % n:
    raise ValueError(f"batch {zimg.shape[0]} is not divisible by the {n} batch shards")
  global_b = zimg.shape[0]
  ring = _make_siglip_ring(axes, n)

  def per_device(zi, zt, t, b):
    if axes:
      t = jax.lax.pcast(t, axes, to="varying")
      b = jax.lax.pcast(b, axes, to="varying")
    local = ring(zi, zt, t, b)
    return (jax.lax.psum(local, axes) if axes else local) / global_b

  spec = P(axes if axes else None)
  return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=P())(
      zimg, ztxt, jnp.asarray(log_scale, jnp.float32), jnp.asarray(bias, jnp.float32))


def _make_clip_ring(axes: tuple[str, ...], n: int):
  """Per-device ``sum(lse over rows) + sum(lse over columns)`` of the CLIP logits.

  Text chunks travel around the ring; each device keeps its image rows. The image rows'
  log-sum-exp accumulates locally (online, over the ``(b, b)`` blocks), the text
  columns' travels with its chunk and is home after the last hop. The custom VJP keeps
  only the embeddings and the two ``(b,)`` normalisers and replays the ring, recomputing
  each block; each text chunk's gradient travels with it, as in the SigLIP ring.
  """
  perm = [(i, (i + 1) % n) for i in range(n)]

  def shift(x):
    return jax.lax.ppermute(x, axes, perm) if n > 1 else x

  def block(zi, ztc, log_scale):
    return jnp.exp(log_scale) * jnp.einsum("id,jd->ij", zi, ztc)

  def normalisers(zi, zt, log_scale):
    def body(carry, _):
      ztc, lse_tc, lse_i = carry
      logits = block(zi, ztc, log_scale)
      lse_i = jnp.logaddexp(lse_i, jax.nn.logsumexp(logits, axis=1))
      lse_tc = jnp.logaddexp(lse_tc, jax.nn.logsumexp(logits, axis=0))
      return (shift(ztc), shift(lse_tc), lse_i), None

    neg = jnp.full((zi.shape[0],), -jnp.inf, jnp.float32)
    neg = jax.lax.pcast(neg, axes, to="varying") if axes else neg
    (_, lse_t, lse_i), _ = jax.lax.scan(body, (zt, neg, neg), None, length=n)
    return lse_i, lse_t

  @jax.custom_vjp
  def ring(zi, zt, log_scale):
    lse_i, lse_t = normalisers(zi, zt, log_scale)
    return jnp.sum(lse_i) + jnp.sum(lse_t)

  def ring_fwd(zi, zt, log_scale):
    lse_i, lse_t = normalisers(zi, zt, log_scale)
    return jnp.sum(lse_i) + jnp.sum(lse_t), (zi, zt, log_scale, lse_i, lse_t)

  def ring_bwd(res, g):
    zi, zt, log_scale, lse_i, lse_t = res
    scale = jnp.exp(log_scale)

    def body(carry, _):
      ztc, lse_tc, gztc, gzi, gt = carry
      logits = block(zi, ztc, log_scale)
      # d(sum lse_i + sum lse_t) / d logits: the row softmax plus the column softmax.
      dl = g * (jnp.exp(logits - lse_i[:, None]) + jnp.exp(logits - lse_tc[None, :]))
      gzi = gzi + scale * (dl @ ztc)
      gztc = gztc + scale * jnp.einsum("ij,id->jd", dl, zi)
      gt = gt + jnp.sum(dl * logits)
      return (shift(ztc), shift(lse_tc), shift(gztc), gzi, gt), None

    init = (zt, lse_t, jnp.zeros_like(zt), jnp.zeros_like(zi), jnp.zeros_like(log_scale))
    (_, _, gzt, gzi, gt), _ = jax.lax.scan(body, init, None, length=n)
    return gzi, gzt, gt

  ring.defvjp(ring_fwd, ring_bwd)
  return ring


def clip_loss_chunked(zimg, ztxt, log_scale, mesh: Mesh, axes: Sequence[str] = BATCH_AXES):
  """CLIP softmax loss as a ppermute ring over the mesh's batch axes.

  Equal to `clip_loss_dense`. Every device holds only ``(b, b)`` blocks of the logits
  (``b = B / devices``) and its own rows of the embeddings: nothing of size ``B x B``
  or ``B x E`` is stored, so per-device memory does not grow with the device count.
  """
  axes, n = _batch_axes(mesh, axes)
  if zimg.shape[0] % n:
    raise ValueError(f"batch {zimg.shape[0]} is not divisible by the {n} batch shards")
  global_b = zimg.shape[0]
  ring = _make_clip_ring(axes, n)

  def per_device(zi, zt, t):
    zi, zt = zi.astype(jnp.float32), zt.astype(jnp.float32)
    if axes:
      t = jax.lax.pcast(t, axes, to="varying")
    positives = jnp.exp(t) * jnp.sum(zi * zt, axis=1)
    local = ring(zi, zt, t) - 2.0 * jnp.sum(positives)
    total = jax.lax.psum(local, axes) if axes else local
    return 0.5 * total / global_b

  spec = P(axes if axes else None)
  return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, P()), out_specs=P())(
      zimg, ztxt, jnp.asarray(log_scale, jnp.float32))


def contrastive_loss(kind: str, zimg, ztxt, log_scale, bias=None, *, mesh: Mesh | None = None,
                     chunked: bool = True):
  """Dispatches on ``kind`` ("clip" or "siglip"); chunked needs a mesh."""
  if kind not in LOSSES:
    raise ValueError(f"unknown loss {kind!r}; use one of {LOSSES} (config.loss)")
  if kind == "siglip" and bias is None:
    raise ValueError("the siglip loss needs a logit bias: set config.model.logit_bias=True")
  # Paired (B, E) embeddings and scalar temperature / bias (checked at trace time).
  chex.assert_rank([zimg, ztxt, log_scale], [2, 2, 0])
  chex.assert_equal_shape([zimg, ztxt])
  if bias is not None:
    chex.assert_rank(bias, 0)
  if chunked and mesh is not None:
    if kind == "clip":
      return clip_loss_chunked(zimg, ztxt, log_scale, mesh)
    return siglip_loss_chunked(zimg, ztxt, log_scale, bias, mesh)
  if kind == "clip":
    return clip_loss_dense(zimg, ztxt, log_scale)
  return siglip_loss_dense(zimg, ztxt, log_scale, bias)
