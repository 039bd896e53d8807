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

import dataclasses
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


_INV_SQRT2 = 0.7071067811865476


def gelu_erf(x):
  """Exact GELU as PyTorch computes it, ``0.5 x (1 + erf(x / sqrt 2))``.

  Equal to ``jax.nn.gelu(approximate=False)`` (which uses ``erfc``) to ~1e-6; on CPU its
  forward plus backward costs about half as much (XLA's ``erfc`` is a piecewise
  polynomial with an ``exp``, ``erf`` one rational polynomial).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * _INV_SQRT2))


def quick_gelu(x):
  """open_clip's QuickGELU: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
    "gelu": gelu_erf,
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _normalize(x, eps: float):
  """``(x - mean) / sqrt(var + eps)`` over the last axis (two-pass variance)."""
  return _normalize_fwd(x, eps)[0]


def _normalize_fwd(x, eps):
  xc = x - jnp.mean(x, axis=-1, keepdims=True)
  r = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
  y = xc * r
  return y, (y, r)


def _normalize_bwd(eps, res, g):
  del eps
  y, r = res
  return (r * (g - jnp.mean(g, axis=-1, keepdims=True)
               - y * jnp.mean(g * y, axis=-1, keepdims=True)),)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


class LayerNorm(nn.Module):
  """LayerNorm with parameters ``scale``, ``bias`` (D,), as `flax.linen.LayerNorm`.

  Statistics and normalisation run in float32 (at least); the backward pass is a custom
  VJP saving only the normalised input and ``1/sigma``, which on CPU avoids materialising
  the broadcast ``scale / sigma`` that the generic LayerNorm keeps for its gradient.
  """

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (d,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      (d,), self.param_dtype)
    compute = jnp.promote_types(x.dtype, jnp.float32)
    y = _normalize(x.astype(compute), float(self.epsilon))
    y = y * scale.astype(compute) + bias.astype(compute)
    return y.astype(self.dtype)


def layer_norm(eps: float, dtype, param_dtype, name=None):
  return LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


class _HeadsIn(nn.Module):
  """``(B, T, D) -> (B, T, H, Dh)`` with kernel ``(D, H, Dh)`` and bias ``(H, Dh)``.

  Called without input it only returns ``(kernel, bias)`` (in ``dtype``), so `Attention`
  can run the query, key and value projections as one matmul.
  """

  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  features_in: int | None = None

  @nn.compact
  def __call__(self, x=None):
    d = x.shape[-1] if x is not None else self.features_in
    init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, ("embed", "heads", "kv")),
                        (d, self.num_heads, self.head_dim), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")),
                      (self.num_heads, self.head_dim), self.param_dtype)
    kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
    if x is None:
      return kernel, bias
    return jnp.einsum("btd,dhk->bthk", x.astype(self.dtype), kernel) + bias


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


def _attend(q, k, v, causal: bool, mask):
  """Softmax attention over ``(B, T, H, Dh)`` operands, softmax in float32.

  The same computation as `jax.nn.dot_product_attention`'s XLA implementation, with the
  ``1/sqrt(Dh)`` scale folded into the (small) query instead of the logits.
  """
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  big_neg = jnp.finfo(jnp.float32).min
  if causal:
    tq, tk = logits.shape[-2:]
    logits = jnp.where(jnp.tril(jnp.ones((tq, tk), jnp.bool_)), logits, big_neg)
  if mask is not None:
    logits = jnp.where(mask, logits, big_neg)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(nn.Module):
  """Multi-head (self- or cross-) attention.

  Inputs: ``xq (B, Tq, D)``, ``xkv (B, Tk, D)``; output ``(B, Tq, D)``. The query, key
  and value projections run as one ``(D, 3, H, Dh)`` matmul for self-attention (key
  and value as one for cross-attention); the parameters stay separate
  (``query/key/value``). ``implementation`` None / "xla" computes attention with two
  einsums and a float32 softmax (for the short sequences of these towers this beats
  `jax.nn.dot_product_attention`'s generic path on CPU); "cudnn" calls
  `jax.nn.dot_product_attention` with the fused flash-attention kernel on NVIDIA GPUs.
  """

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, xq, xkv=None, *, causal: bool = False, mask=None):
    self_attn = xkv is None
    xkv = xq if xkv is None else xkv
    d = xq.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads {self.num_heads}")
    dh, h = d // self.num_heads, self.num_heads
    proj = {n: _HeadsIn(h, dh, self.dtype, self.param_dtype, features_in=d, name=n)()
            for n in ("query", "key", "value")}
    names = ("query", "key", "value") if self_attn else ("key", "value")
    # Stacked on a new axis (not concatenated along heads) so a heads sharding carries over.
    kernel = jnp.stack([proj[n][0] for n in names], axis=1)  # (D, 2|3, H, Dh)
    bias = jnp.stack([proj[n][1] for n in names], axis=0)
    fused = jnp.einsum("btd,dchk->btchk", xkv.astype(self.dtype), kernel) + bias
    if self_attn:
      q, k, v = fused[:, :, 0], fused[:, :, 1], fused[:, :, 2]
    else:
      k, v = fused[:, :, 0], fused[:, :, 1]
      q = jnp.einsum("btd,dhk->bthk", xq.astype(self.dtype), proj["query"][0]) + proj["query"][1]
    q = nn.with_logical_constraint(q, ("batch", "act_seq", "act_heads", "act_kv"))
    impl = self.implementation
    if impl in ("", "auto", "xla"):
      impl = None
    if impl is None:
      y = _attend(q, k, v, causal, mask)
    else:
      y = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=impl)
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


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Hyper-parameters of a transformer block, shared by every block of an `Encoder`
  (and by a tower's `MAPHead`, which ignores ``causal``)."""

  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  ln_eps: float = 1e-6
  causal: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attn_impl: str | None = None

  @classmethod
  def of(cls, tower) -> BlockConfig:
    """The block hyper-parameters of a tower module, read from its same-named fields
    (those it lacks, e.g. ``causal`` of the image tower, keep their defaults)."""
    names = [f.name for f in dataclasses.fields(cls) if hasattr(tower, f.name)]
    return cls(**{n: getattr(tower, n) for n in names})


class Block(nn.Module):
  """Pre-LN transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

  cfg: BlockConfig
  scan_mode: bool = False  # return (x, None), the carry signature `nn.scan` wants

  @nn.compact
  def __call__(self, x, mask=None):
    c = self.cfg
    x = nn.with_logical_constraint(x, ("batch", "act_seq", "act_embed"))
    y = layer_norm(c.ln_eps, c.dtype, c.param_dtype, "ln_1")(x)
    y = Attention(c.num_heads, c.dtype, c.param_dtype, c.attn_impl, name="attn")(
        y, causal=c.causal, mask=mask)
    x = x + y
    y = layer_norm(c.ln_eps, c.dtype, c.param_dtype, "ln_2")(x)
    y = Mlp(c.mlp_dim, c.act, c.dtype, c.param_dtype, name="mlp")(y)
    x = x + y
    return (x, None) if self.scan_mode else x


class Encoder(nn.Module):
  """A stack of `depth` blocks, each built from ``cfg``.

  ``scan_layers=True`` stacks the blocks' parameters along a leading ``layers`` axis and
  runs them with `nn.scan` (one compiled block: large models compile in seconds); the
  unscanned layout names them ``block_0 .. block_{depth-1}``. ``remat_policy`` wraps each
  block in `nn.remat` with the named checkpoint policy.
  """

  depth: int
  cfg: BlockConfig
  scan_layers: bool = False
  remat: str = "none"

  @nn.compact
  def __call__(self, x, mask=None):
    policy = remat_policy(self.remat)
    if self.scan_layers:
      cls = Block
      if self.remat != "none":
        cls = nn.remat(cls, policy=policy, prevent_cse=False)
      scanned = nn.scan(
          cls, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=nn.broadcast, length=self.depth,
          metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(self.cfg, scan_mode=True, name="blocks")(x, mask)
      return x
    cls = Block
    if self.remat != "none":
      cls = nn.remat(Block, policy=policy)
    for i in range(self.depth):
      x = cls(self.cfg, name=f"block_{i}")(x, mask)
    return x


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens.

  ``x (B, T, D) -> (B, D)``; the probe's output goes through a residual MLP. Heads, MLP
  width, activation, epsilon and dtypes come from ``cfg`` (``causal`` is not used).
  """

  cfg: BlockConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    b, _, d = x.shape
    probe = self.param(
        "probe", nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, None, "embed")),
        (1, 1, d), c.param_dtype)
    probe = jnp.tile(probe.astype(c.dtype), (b, 1, 1))
    y = Attention(c.num_heads, c.dtype, c.param_dtype, c.attn_impl, name="attn")(probe, x)
    z = layer_norm(c.ln_eps, c.dtype, c.param_dtype, "ln")(y)
    y = y + Mlp(c.mlp_dim, c.act, c.dtype, c.param_dtype, name="mlp")(z)
    return y[:, 0]


def projection(features: int, use_bias: bool, dtype, param_dtype, name: str):
  """The tower's output projection to the shared embedding space."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "proj")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("proj",)))
