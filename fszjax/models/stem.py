"""A convolutional stem for the ViT image tower ("early convolutions", Xiao et al. 2021).

Instead of one strided ``p x p`` patch convolution, a few 3x3 convolutions (each followed
by LayerNorm over channels and GELU) bring the image to the token grid, and a 1x1
convolution maps to the Transformer width. The token grid is the same as the patch
embedding's (``H / p x W / p``), so everything after the stem (position embedding,
blocks, pooling) is unchanged and the same config scales from 32 px glyphs to B/16.

``channels`` lists the stem's 3x3 layers; the first ``log2(p)`` of them have stride 2 and
any further ones stride 1 (`layer_plan`; ``p`` must be a power of two, and when the list
has fewer than ``log2(p)`` layers its last width repeats). Parameters: ``stem/s{i}/{kernel, bias}``, ``stem/n{i}/{scale, bias}`` and the
1x1 projection ``stem/embedding/{kernel (1, 1, c, D), bias}`` (the ``s``/``n`` names keep
the stem out of `fszjax.fewshot.inner`'s block numbering).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn


def layer_plan(patch_size: int, channels: Sequence[int]) -> list[tuple[int, int]]:
  """``[(channels, stride)]`` of the stem's 3x3 layers for `patch_size`: one stride-2 layer
  per factor 2 of the patch size (the last listed width repeats when the list is shorter),
  then the remaining listed layers with stride 1. Raises ValueError for a patch size that
  is not a power of two."""
  s = int(round(math.log2(patch_size))) if patch_size > 0 else -1
  if patch_size <= 0 or 2 ** s != patch_size:
    raise ValueError(f"a convolutional stem needs a power-of-two patch size, got {patch_size}; "
                     "set config.model.image.stem=() for the plain patch embedding")
  channels = [int(c) for c in channels]
  if not channels:
    raise ValueError("a convolutional stem needs at least one layer width")
  widths = channels + [channels[-1]] * max(0, s - len(channels))
  return [(c, 2 if i < s else 1) for i, c in enumerate(widths)]


class ConvStem(nn.Module):
  """``images (B, H, W, C) -> tokens (B, H/p, W/p, width)``."""

  channels: Sequence[int]
  patch_size: int
  width: int
  ln_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    x = images.astype(self.dtype)
    for i, (c, stride) in enumerate(layer_plan(self.patch_size, self.channels)):
      x = nn.Conv(
          int(c), (3, 3), strides=stride, padding="SAME", dtype=self.dtype,
          param_dtype=self.param_dtype, name=f"s{i}",
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.lecun_normal(), (None, None, None, None)),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(x)
      x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                       name=f"n{i}",
                       scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))(x)
      x = nn.gelu(x, approximate=False)
    return nn.Conv(
        self.width, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype, name="embedding",
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (None, None, None, "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(x)
