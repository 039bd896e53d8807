"""Transformer building blocks shared by the image and text towers.

Every parameter carries logical axis names (``nn.with_logical_partitioning``) so the
rules table in `fszjax.sharding` decides how it is laid out on the mesh. Computation
runs in ``dtype`` (e.g. bfloat16) while parameters stay in ``param_dtype`` (float32).

Parameter layout (shared by both towers, and what the converters map to):

  block/
    ln_1/{scale, bias}                       (D,)
    attn/{query,key,value}/{kernel (D, H, Dh), bias (H, Dh)}
    attn/out/{kernel (H, Dh, D), bias (D,)}
    ln_2/{scale, bias}
    mlp/fc1/{kernel (D, M), bias (M,)}
    mlp/fc2/{kernel (M, D), bias (D,)}
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name_or_dtype) -> Dtype:
  if isinstance(name_or_dtype, str):
    if name_or_dtype not in _DTYPES:
      raise ValueError(f"unknown dtype {name_or_dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name_or_dtype]
  return name_or_dtype


def quick_gelu(x):
  """open_clip's QuickGELU: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


# Remat policies by name (what to *save* for the backward pass).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_everything": jax.checkpoint_policies.everything_saveable,
}


def remat_policy(name: str):
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {name!r}; use one of {sorted(REMAT_POLICIES)}")
  return REMAT_POLICIES[name]


def dense_init():
  return nn.initializers.xavier_uniform()


def layer_norm(eps: float, dtype, param_dtype, name=None):
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


class _HeadsIn(nn.Module):
  """``(B, T, D) -> (B, T, H, Dh)`` with kernel ``(D, H, Dh)`` and bias ``(H, Dh)``."""

  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, ("embed", "heads", "kv")),
                        (d, self.num_heads, self.head_dim), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")),
                      (self.num_heads, self.head_dim), self.param_dtype)
    return jnp.einsum("btd,dhk->bthk", x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class _HeadsOut(nn.Module):
  """``(B, T, H, Dh) -> (B, T, D)`` with kernel ``(H, Dh, D)`` and bias ``(D,)``."""

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y):
    h, k = y.shape[-2:]
    init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, ("heads", "kv", "embed")),
                        (h, k, self.features), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                      (self.features,), self.param_dtype)
    return jnp.einsum("bthk,hkd->btd", y.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class Attention(nn.Module):
  """Multi-head (self- or cross-) attention through `jax.nn.dot_product_attention`.

  Inputs: ``xq (B, Tq, D)``, ``xkv (B, Tk, D)``; output ``(B, Tq, D)``.
  ``implementation`` is passed through (``None``/"xla"/"cudnn"): "cudnn" selects the
  fused flash-attention kernel on NVIDIA GPUs.
  """

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, xq, xkv=None, *, causal: bool = False, mask=None):
    xkv = xq if xkv is None else xkv
    d = xq.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads {self.num_heads}")
    dh = d // self.num_heads

    q = _HeadsIn(self.num_heads, dh, self.dtype, self.param_dtype, name="query")(xq)
    k = _HeadsIn(self.num_heads, dh, self.dtype, self.param_dtype, name="key")(xkv)
    v = _HeadsIn(self.num_heads, dh, self.dtype, self.param_dtype, name="value")(xkv)
    q = nn.with_logical_constraint(q, ("batch", "act_seq", "act_heads", "act_kv"))
    impl = self.implementation
    if impl in ("", "auto"):
      impl = None
    y = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal, implementation=impl)
    return _HeadsOut(d, self.dtype, self.param_dtype, name="out")(y)


class Mlp(nn.Module):
  """Two dense layers with an activation between: ``(..., D) -> (..., M) -> (..., D)``."""

  mlp_dim: int
  act: str = "gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    h = nn.Dense(
        self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1",
        kernel_init=nn.with_logical_partitioning(dense_init(), ("embed", "mlp")),
        bias_init=nn.with_logical_partitioning(nn.initializers.normal(1e-6), ("mlp",)))(x)
    h = activation(self.act)(h)
    h = nn.with_logical_constraint(h, ("batch", "act_seq", "act_mlp"))
    return nn.Dense(
        d, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2",
        kernel_init=nn.with_logical_partitioning(dense_init(), ("mlp", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.normal(1e-6), ("embed",)))(h)


class Block(nn.Module):
  """Pre-LN transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  ln_eps: float = 1e-6
  causal: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attn_impl: str | None = None
  scan_mode: bool = False  # return (x, None), the carry signature `nn.scan` wants

  @nn.compact
  def __call__(self, x, mask=None):
    x = nn.with_logical_constraint(x, ("batch", "act_seq", "act_embed"))
    y = layer_norm(self.ln_eps, self.dtype, self.param_dtype, "ln_1")(x)
    y = Attention(self.num_heads, self.dtype, self.param_dtype, self.attn_impl, name="attn")(
        y, causal=self.causal, mask=mask)
    x = x + y
    y = layer_norm(self.ln_eps, self.dtype, self.param_dtype, "ln_2")(x)
    y = Mlp(self.mlp_dim, self.act, self.dtype, self.param_dtype, name="mlp")(y)
    x = x + y
    return (x, None) if self.scan_mode else x


class Encoder(nn.Module):
  """A stack of `depth` blocks.

  ``scan_layers=True`` stacks the blocks' parameters along a leading ``layers`` axis and
  runs them with `nn.scan` (one compiled block: large models compile in seconds); the
  unscanned layout names them ``block_0 .. block_{depth-1}``. ``remat_policy`` wraps each
  block in `nn.remat` with the named checkpoint policy.
  """

  depth: int
  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  ln_eps: float = 1e-6
  causal: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attn_impl: str | None = None
  scan_layers: bool = False
  remat: str = "none"

  @nn.compact
  def __call__(self, x, mask=None):
    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, act=self.act, ln_eps=self.ln_eps,
              causal=self.causal, dtype=self.dtype, param_dtype=self.param_dtype,
              attn_impl=self.attn_impl)
    policy = remat_policy(self.remat)
    if self.scan_layers:
      cls = Block
      if self.remat != "none":
        cls = nn.remat(cls, policy=policy, prevent_cse=False)
      scanned = nn.scan(
          cls, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=nn.broadcast, length=self.depth,
          metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(**kw, scan_mode=True, name="blocks")(x, mask)
      return x
    cls = Block
    if self.remat != "none":
      cls = nn.remat(Block, policy=policy)
    for i in range(self.depth):
      x = cls(**kw, name=f"block_{i}")(x, mask)
    return x


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens.

  ``x (B, T, D) -> (B, D)``; the probe's output goes through a residual MLP.
  """

  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  ln_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attn_impl: str | None = None

  @nn.compact
  def __call__(self, x):
    b, _, d = x.shape
    probe = self.param(
        "probe", nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, None, "embed")),
        (1, 1, d), self.param_dtype)
    probe = jnp.tile(probe.astype(self.dtype), (b, 1, 1))
    y = Attention(self.num_heads, self.dtype, self.param_dtype, self.attn_impl, name="attn")(probe, x)
    z = layer_norm(self.ln_eps, self.dtype, self.param_dtype, "ln")(y)
    y = y + Mlp(self.mlp_dim, self.act, self.dtype, self.param_dtype, name="mlp")(z)
    return y[:, 0]


def projection(features: int, use_bias: bool, dtype, param_dtype, name: str):
  """The tower's output projection to the shared embedding space."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "proj")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("proj",)))
