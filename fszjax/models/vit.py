"""Vision Transformer image tower.

``images (B, H, W, C) -> (embedding (B, E), extras)`` where ``extras`` holds the
pre-projection pooled features and the final token sequence.

Parameters (top level of the tower):
  embedding/{kernel (p, p, C, D), bias (D,)?}   patch embedding (a strided conv)
  cls (1, 1, D)                                 class token (pool='tok')
  pos_embedding (1, T, D)                       learned (posemb='learn'; T includes cls)
  ln_pre/{scale, bias}                          optional (open_clip)
  encoder/block_i/... or encoder/blocks/...     see `common.Encoder`
  ln_post/{scale, bias}                         final norm
  map_head/...                                  attention-pooling head (pool='map')
  head/{kernel (D, E), bias (E,)?}              projection (proj='linear' / 'linear_bias')
"""

from __future__ import annotations

import re
from typing import Any

import chex
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from fszjax.models import common
from fszjax.models.stem import ConvStem

# name: (width, depth, mlp_dim, heads)
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}


def parse_variant(variant: str) -> tuple[tuple[int, int, int, int], int | None]:
  """``"B/16" -> ((768, 12, 3072, 12), 16)``; ``"mu" -> (VARIANTS["mu"], None)``."""
  m = re.fullmatch(r"([A-Za-z0-9]+?)(?:/(\d+))?", variant)
  if not m or m.group(1) not in VARIANTS:
    raise ValueError(f"unknown model variant {variant!r}; use one of {sorted(VARIANTS)} "
                     "optionally with /<patch size>, e.g. 'B/16'")
  return VARIANTS[m.group(1)], (int(m.group(2)) if m.group(2) else None)


def sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding, ``(1, h*w, width)``."""
  if width % 4:
    raise ValueError(f"sincos2d position embedding needs width % 4 == 0, got {width}")
  y, x = np.mgrid[:h, :w]
  omega = np.arange(width // 4) / (width // 4 - 1 if width > 4 else 1)
  omega = 1.0 / (temperature ** omega)
  y = np.einsum("m,d->md", y.reshape(-1), omega)
  x = np.einsum("m,d->md", x.reshape(-1), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


class ViT(nn.Module):
  """Image tower. See the module docstring for the parameter layout."""

  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int = 16
  embed_dim: int | None = None  # output size; None = no projection
  pool: str = "map"  # tok | gap | map | none
  posemb: str = "learn"  # learn | sincos2d
  ln_pre: bool = False
  final_ln_after_pool: bool = False
  patch_bias: bool = True
  proj_bias: bool = False
  act: str = "gelu"
  ln_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attn_impl: str | None = None
  scan_layers: bool = False
  remat: str = "none"
  stem: tuple[int, ...] = ()  # conv stem channels (`fszjax.models.stem`); () = patch conv

  @nn.compact
  def __call__(self, images):
    if images.ndim != 4:
      raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
    chex.assert_type(images, float)  # normalised pixels, not raw uint8 (see inference.preprocess)
    if self.stem:
      x = ConvStem(tuple(self.stem), self.patch_size, self.width, ln_eps=self.ln_eps,
                   dtype=self.dtype, param_dtype=self.param_dtype, name="stem")(images)
    else:
      x = nn.Conv(
          self.width, (self.patch_size, self.patch_size), strides=self.patch_size,
          padding="VALID", use_bias=self.patch_bias, dtype=self.dtype,
          param_dtype=self.param_dtype, name="embedding",
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.lecun_normal(), (None, None, None, "embed")),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(
              images.astype(self.dtype))
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    if self.pool == "tok":
      cls = self.param("cls", nn.with_logical_partitioning(
          nn.initializers.normal(d ** -0.5), (None, None, "embed")), (1, 1, d), self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (b, 1, 1)), x], axis=1)
    n = x.shape[1]
    if self.posemb == "learn":
      pe = self.param("pos_embedding", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (None, "seq", "embed")), (1, n, d), self.param_dtype)
    elif self.posemb == "sincos2d":
      pe = jnp.asarray(sincos_2d(h, w, d))
      if self.pool == "tok":
        pe = jnp.concatenate([jnp.zeros((1, 1, d), pe.dtype), pe], axis=1)
    else:
      raise ValueError(f"unknown posemb {self.posemb!r}; use 'learn' or 'sincos2d'")
    x = x + pe.astype(x.dtype)
    if self.ln_pre:
      x = common.layer_norm(self.ln_eps, self.dtype, self.param_dtype, "ln_pre")(x)
    block = common.BlockConfig.of(self)  # causal=False: the image tower has no such field
    x = common.Encoder(self.depth, block, scan_layers=self.scan_layers, remat=self.remat,
                       name="encoder")(x)
    ln_post = common.layer_norm(self.ln_eps, self.dtype, self.param_dtype, "ln_post")
    if not self.final_ln_after_pool:
      x = ln_post(x)
    tokens = x
    if self.pool == "tok":
      pooled = x[:, 0]
    elif self.pool == "gap":
      pooled = x.mean(axis=1)
    elif self.pool == "map":
      pooled = common.MAPHead(block, name="map_head")(x)
    elif self.pool == "none":
      pooled = x
    else:
      raise ValueError(f"unknown image pool {self.pool!r}; use tok, gap, map or none")
    if self.final_ln_after_pool:
      pooled = ln_post(pooled)
    features = pooled
    if self.embed_dim is not None:
      pooled = common.projection(self.embed_dim, self.proj_bias, self.dtype, self.param_dtype,
                                 "head")(pooled)
    out_dim = d if self.embed_dim is None else self.embed_dim
    chex.assert_shape(pooled, (b, n, out_dim) if self.pool == "none" else (b, out_dim))
    return pooled, {"features": features, "tokens": tokens}
