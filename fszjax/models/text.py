"""Text Transformer tower.

``tokens (B, L) int32 -> (embedding (B, E), extras)``.

Token conventions (see `fszjax.data.tokenizer`): pad id 0; the end-of-text token has the
highest id in the vocabulary, so ``pool='eot'`` (open_clip) takes the position of the
largest token id.

Parameters:
  token_embedding/embedding (V, D)
  pos_embedding (1, L, D)
  encoder/...                    see `common.Encoder`
  ln_final/{scale, bias}
  head/{kernel (D, E), bias (E,)?}
"""

from __future__ import annotations

from typing import Any

import chex
import jax.numpy as jnp
from flax import linen as nn

from fszjax.models import common

POOLS = ("eot", "last", "first", "mean")


def pool_tokens(x, tokens, pool: str, pad_id: int = 0):
  """Pools ``x (B, L, D)`` to ``(B, D)``.

  eot: position of the highest token id (the end-of-text token, open_clip);
  last / first: the last / first position; mean: mean over non-pad positions.
  """
  if pool == "eot":
    idx = jnp.argmax(tokens, axis=-1)
    return jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
  if pool == "last":
    return x[:, -1]
  if pool == "first":
    return x[:, 0]
  if pool == "mean":
    m = (tokens != pad_id).astype(x.dtype)[..., None]
    return (x * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)
  raise ValueError(f"unknown text pool {pool!r}; use one of {POOLS}")


class _TokenEmbed(nn.Module):
  """Token lookup ``(B, L) -> (B, L, D)`` from ``embedding (V, D)``.

  The table is gathered along its (fsdp-sharded) width before the lookup, as FSDP does
  for every weight, so the result can take the batch sharding of the tokens.
  """

  vocab_size: int
  width: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    table = self.param("embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("vocab", "embed")), (self.vocab_size, self.width),
                       self.param_dtype)
    table = nn.with_logical_constraint(table, ("vocab", "act_embed"))
    return jnp.take(table.astype(self.dtype), tokens, axis=0)


class TextTower(nn.Module):
  """Text tower. ``causal=True`` is open_clip's CLIP text model; SigLIP is bidirectional."""

  vocab_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  max_len: int = 16
  embed_dim: int | None = None
  pool: str = "eot"
  causal: bool = True
  proj_bias: bool = False
  act: str = "gelu"
  ln_eps: float = 1e-6
  pad_id: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attn_impl: str | None = None
  scan_layers: bool = False
  remat: str = "none"

  @nn.compact
  def __call__(self, tokens, return_hidden: bool = False):
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be (B, L), got shape {tokens.shape}")
    chex.assert_type(tokens, int)  # token ids (the tokenizer's int32), not embeddings or floats
    batch, length = tokens.shape
    if length > self.max_len:
      raise ValueError(f"token length {length} exceeds the text tower's max_len {self.max_len}")
    x = _TokenEmbed(self.vocab_size, self.width, self.dtype, self.param_dtype,
                    name="token_embedding")(tokens)
    x = nn.with_logical_constraint(x, ("batch", "act_seq", "act_embed"))
    pe = self.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.01), (None, "seq", "embed")), (1, self.max_len, self.width),
                    self.param_dtype)
    x = x + pe[:, :length].astype(x.dtype)
    x = common.Encoder(self.depth, common.BlockConfig.of(self), scan_layers=self.scan_layers,
                       remat=self.remat, name="encoder")(x)
    x = common.layer_norm(self.ln_eps, self.dtype, self.param_dtype, "ln_final")(x)
    pooled = pool_tokens(x, tokens, self.pool, self.pad_id)
    features = pooled
    if self.embed_dim is not None:
      pooled = common.projection(self.embed_dim, self.proj_bias, self.dtype, self.param_dtype,
                                 "head")(pooled)
    chex.assert_shape(pooled, (batch, self.width if self.embed_dim is None else self.embed_dim))
    extras = {"features": features}
    if return_hidden:
      extras["tokens"] = x
    return pooled, extras
