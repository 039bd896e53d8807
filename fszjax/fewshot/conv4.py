"""Conv-4: the MAML paper's Omniglot network, written as functional JAX.

Four blocks of [3x3 conv, 64 channels, stride 2, padding 1] -> [per-task batch norm or
nothing] -> ReLU, on 28x28 grayscale (28 -> 14 -> 7 -> 4 -> 2), then a spatial mean (as in
learn2learn's ``OmniglotCNN``) or a flatten, giving features ``(B, D)``. The classifier is
the generic linear head ``{'w': (D, N), 'b': (N,)}`` of `fszjax.fewshot.inner`.

Parameters::

  {'backbone': {'conv0': {'w': (3, 3, Cin, C), 'scale': (C,), 'offset': (C,)}, ...,
                'conv3': {...}},
   'head': {'w': (D, N), 'b': (N,)}}

With ``norm='none'`` each conv has a bias ``'b': (C,)`` instead of ``scale``/``offset``
(a bias before batch norm is redundant).

Batch norm here is *per-task batch statistics*: mean and variance over the examples of the
call (support or query set of one task), no running averages -- what MAML and
learn2learn (``track_running_stats=False``) do.

Formulations of the convolution (``formulation=``), all numerically the same function:

- ``'im2col'``: patches from 9 strided slices of the padded input, concatenated on the
  channel axis, times the weight matrix ``(9*Cin, C)`` (one (batched) matmul). The
  transpose of a strided slice is a cheap interior pad, so its gradients (and the
  second-order terms of MAML) stay matmuls and pads. Fastest on XLA:CPU; the default.
- ``'patches'``: ``lax.conv_general_dilated_patches`` times the weight matrix.
- ``'s2d'``: space-to-depth: the padded input reshaped to ``(H/2, W/2, 4*Cin)`` and a 2x2
  stride-1 im2col over it with contiguous slices (16/9 more flops, no strided access).
- ``'conv'``: ``lax.conv_general_dilated`` (the reference). Under ``vmap`` over tasks with
  per-task weights JAX lowers it to a grouped convolution, which XLA:CPU runs slowly.
  On GPU/TPU it is the natural choice (cuDNN / TPU convolutions; not measured here).

Measured (2-vCPU AMD EPYC VM shared with other jobs, load ~3, 2026-11-27; second-order
MAML, 5-way 1-shot, 5 inner steps, meta-batch 32, per-task batch norm, chunks of 4 tasks,
remat; `benchmarks/bench_maml.py`): im2col 48.5 tasks/s (61.1 with the meta-batch
sharded over 2 CPU devices), patches 29.4, s2d 26.5, conv 3.7. bfloat16 matmul operands
(``compute_dtype``) were not faster on this CPU (the casts cost what the dots save).

The functions below treat one task (leading axis = examples). Algorithms ``vmap`` them
over tasks; the matmul formulations then become batched matmuls with the task axis as
the batch dimension.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

FORMULATIONS = ("im2col", "patches", "s2d", "conv")
NORMS = ("batch", "none")
POOLS = ("mean", "flatten")
BN_EPS = 1e-3
DEFAULT_FORMULATION = "im2col"


def _check(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"conv4 {name}={value!r} is not one of {allowed}")


def conv4_feature_dim(hidden: int = 64, image_size: int = 28, layers: int = 4,
                      pool: str = "mean") -> int:
  """Feature size D of `conv4_features` for this configuration."""
  _check("pool", pool, POOLS)
  if pool == "mean":
    return hidden
  s = image_size
  for _ in range(layers):
    s = (s - 1) // 2 + 1
  return hidden * s * s


def init_conv4(key: jax.Array, n_way: int = 5, *, in_channels: int = 1, hidden: int = 64,
               layers: int = 4, norm: str = "batch", image_size: int = 28,
               pool: str = "mean", dtype=jnp.float32) -> dict:
  """Initial Conv-4 parameters (He-normal convs, unit BN scale, zero head).

  Returns ``{'backbone': {...}, 'head': {'w': (D, n_way), 'b': (n_way,)}}``.
  """
  _check("norm", norm, NORMS)
  keys = jax.random.split(key, layers + 1)
  backbone = {}
  cin = in_channels
  for i in range(layers):
    std = math.sqrt(2.0 / (9 * cin))
    block = {"w": std * jax.random.normal(keys[i], (3, 3, cin, hidden), dtype)}
    if norm == "batch":
      block["scale"] = jnp.ones((hidden,), dtype)
      block["offset"] = jnp.zeros((hidden,), dtype)
    else:
      block["b"] = jnp.zeros((hidden,), dtype)
    backbone[f"conv{i}"] = block
    cin = hidden
  d = conv4_feature_dim(hidden, image_size, layers, pool)
  head = {"w": jax.random.normal(keys[-1], (d, n_way), dtype) / math.sqrt(d),
          "b": jnp.zeros((n_way,), dtype)}
  return {"backbone": backbone, "head": head}


def _out_size(n: int) -> int:
  """Output size of a 3x3, stride-2, padding-1 convolution."""
  return (n - 1) // 2 + 1


def _im2col(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, Ho, Wo, 9*C) patches, channel order (kh, kw, c)."""
  b, h, w, c = x.shape
  ho, wo = _out_size(h), _out_size(w)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = [
      lax.slice(xp, (0, i, j, 0), (b, i + 2 * ho - 1, j + 2 * wo - 1, c), (1, 2, 2, 1))
      for i in range(3) for j in range(3)
  ]
  return jnp.concatenate(cols, axis=-1)


def _s2d_cols(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, Ho, Wo, 16*C): space-to-depth then 2x2 patches.

  Channel order (di, dj, pi, pj, c): block offset (di, dj) in {0,1}^2, phase (pi, pj).
  Input row ``2*o + kh`` (padded) lies in block ``o + kh // 2`` at phase ``kh % 2``.
  """
  b, h, w, c = x.shape
  ho, wo = _out_size(h), _out_size(w)
  hp, wp = 2 * (ho + 1), 2 * (wo + 1)
  xp = jnp.pad(x, ((0, 0), (1, hp - h - 1), (1, wp - w - 1), (0, 0)))
  xs = xp.reshape(b, ho + 1, 2, wo + 1, 2, c).transpose(0, 1, 3, 2, 4, 5)
  xs = xs.reshape(b, ho + 1, wo + 1, 4 * c)
  cols = [xs[:, di:di + ho, dj:dj + wo, :] for di in range(2) for dj in range(2)]
  return jnp.concatenate(cols, axis=-1)


def _s2d_weight(w: jax.Array) -> jax.Array:
  """(3, 3, Cin, O) -> (16*Cin, O) matching `_s2d_cols` (taps with 2*d+p > 2 are zero)."""
  wpad = jnp.pad(w, ((0, 1), (0, 1), (0, 0), (0, 0)))  # (4, 4, Cin, O), index 2*d + p
  cin, o = w.shape[2], w.shape[3]
  wr = wpad.reshape(2, 2, 2, 2, cin, o)  # (di, pi, dj, pj, c, o)
  return wr.transpose(0, 2, 1, 3, 4, 5).reshape(16 * cin, o)


def _matmul(cols: jax.Array, wmat: jax.Array, compute_dtype) -> jax.Array:
  """(B, H, W, K) @ (K, O) -> (B, H, W, O) in float32, operands cast to compute_dtype."""
  if compute_dtype is not None:
    cols, wmat = cols.astype(compute_dtype), wmat.astype(compute_dtype)
  return jnp.einsum("bhwk,ko->bhwo", cols, wmat, preferred_element_type=jnp.float32)


def conv3x3s2(x: jax.Array, w: jax.Array, formulation: str = DEFAULT_FORMULATION,
              compute_dtype=None) -> jax.Array:
  """3x3, stride-2, padding-1 convolution without bias.

  Args:
    x: (B, H, W, Cin) images of one task.
    w: (3, 3, Cin, O) kernel (HWIO).
    formulation: one of `FORMULATIONS`.
    compute_dtype: dtype of the matmul operands (e.g. jnp.bfloat16; accumulation and
      result stay float32); None keeps the inputs' dtype.
  Returns:
    (B, Ho, Wo, O) with Ho = (H - 1) // 2 + 1.
  """
  cin, o = w.shape[2], w.shape[3]
  if compute_dtype is not None:  # cast before im2col: the patches are built in compute_dtype
    x = x.astype(compute_dtype)
  if formulation == "im2col":
    return _matmul(_im2col(x), w.reshape(9 * cin, o), compute_dtype)
  if formulation == "patches":
    p = lax.conv_general_dilated_patches(
        x, (3, 3), (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    # Patch channels come out ordered (c, kh, kw).
    return _matmul(p, w.transpose(2, 0, 1, 3).reshape(9 * cin, o), compute_dtype)
  if formulation == "s2d":
    return _matmul(_s2d_cols(x), _s2d_weight(w), compute_dtype)
  if formulation == "conv":
    if compute_dtype is not None:
      x, w = x.astype(compute_dtype), w.astype(compute_dtype)
    return lax.conv_general_dilated(
        x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32)
  raise ValueError(f"conv4 formulation={formulation!r} is not one of {FORMULATIONS}")


def batch_norm(x: jax.Array, scale: jax.Array, offset: jax.Array,
               eps: float = BN_EPS) -> jax.Array:
  """Per-call (per-task) batch norm of (B, H, W, C) over (B, H, W); no running stats."""
  mean = jnp.mean(x, axis=(0, 1, 2))
  var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
  return (x - mean) * (scale * lax.rsqrt(var + eps)) + offset


def conv4_features(backbone: dict, x: jax.Array, *, formulation: str = DEFAULT_FORMULATION,
                   pool: str = "mean", compute_dtype=None) -> jax.Array:
  """Conv-4 features of one task's examples.

  Args:
    backbone: ``params['backbone']`` from `init_conv4` (norm inferred from its keys).
    x: (B, H, W, Cin) images, or (B, H, W) grayscale.
    formulation: one of `FORMULATIONS`.
    pool: ``'mean'`` (D = hidden) or ``'flatten'`` (D = hidden * Hf * Wf).
    compute_dtype: matmul operand dtype (e.g. jnp.bfloat16); None: float32 throughout.
  Returns:
    (B, D) features.
  """
  _check("pool", pool, POOLS)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(f"conv4 expects images (B, H, W, C) or (B, H, W); got shape {x.shape}")
  h = x
  for name in sorted(backbone, key=lambda s: int(s[4:])):
    block = backbone[name]
    h = conv3x3s2(h, block["w"], formulation, compute_dtype)
    if "scale" in block:
      h = batch_norm(h, block["scale"], block["offset"])
    else:
      h = h + block["b"]
    h = jax.nn.relu(h)
  if pool == "mean":
    return jnp.mean(h, axis=(1, 2))
  return h.reshape(h.shape[0], -1)


def make_conv4_features_fn(formulation: str = DEFAULT_FORMULATION, pool: str = "mean",
                           compute_dtype=None):
  """``features_fn(backbone, x) -> (B, D)`` for the algorithms of `fszjax.fewshot.meta`."""
  _check("formulation", formulation, FORMULATIONS)
  _check("pool", pool, POOLS)
  if isinstance(compute_dtype, str):
    if compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"conv4 compute_dtype={compute_dtype!r}: use 'float32' or 'bfloat16'")
    compute_dtype = None if compute_dtype == "float32" else jnp.bfloat16

  def features_fn(backbone: Any, x: jax.Array) -> jax.Array:
    return conv4_features(backbone, x, formulation=formulation, pool=pool,
                          compute_dtype=compute_dtype)

  return features_fn
