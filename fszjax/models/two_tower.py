"""The two-tower (image + text) contrastive model and its construction from a config.

``TwoTower.apply(variables, images, tokens) -> (zimg (B, E), ztxt (B, E), out)`` with
L2-normalised embeddings and ``out = {"logit_scale": exp(t), "logit_bias": b, ...}``.
Either input may be ``None`` (its embedding is then ``None``).

Top-level parameters: ``img/...`` (`ViT`), ``txt/...`` (`TextTower`), ``logit_scale``
(scalar, log form: the temperature is ``exp(logit_scale)``) and, for SigLIP,
``logit_bias`` (scalar).
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from fszjax.models import common, text, vit


def l2_normalize(x, eps: float = 1e-12):
  x32 = x.astype(jnp.float32)
  return x32 * jnp.reciprocal(jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), eps))


class TwoTower(nn.Module):
  img: vit.ViT
  txt: text.TextTower
  logit_scale_init: float = 10.0
  logit_bias_init: float | None = None
  logit_scale_max: float | None = 100.0

  def setup(self):
    self.logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(math.log(self.logit_scale_init)), ()), (), jnp.float32)
    if self.logit_bias_init is not None:
      self.logit_bias = self.param(
          "logit_bias", nn.with_logical_partitioning(
              nn.initializers.constant(self.logit_bias_init), ()), (), jnp.float32)

  def encode_image(self, images, normalize: bool = True):
    z, _ = self.img(images)
    return l2_normalize(z) if normalize else z

  def encode_text(self, tokens, normalize: bool = True):
    z, _ = self.txt(tokens)
    return l2_normalize(z) if normalize else z

  def scale_and_bias(self):
    t = self.logit_scale
    if self.logit_scale_max is not None:
      t = jnp.minimum(t, math.log(self.logit_scale_max))
    b = self.logit_bias if self.logit_bias_init is not None else None
    return t, b

  def __call__(self, images, tokens):
    zimg = ztxt = None
    out: dict[str, Any] = {}
    if images is not None:
      zimg_raw, out["img"] = self.img(images)
      zimg = l2_normalize(zimg_raw)
    if tokens is not None:
      ztxt_raw, out["txt"] = self.txt(tokens)
      ztxt = l2_normalize(ztxt_raw)
    t, b = self.scale_and_bias()
    out["log_logit_scale"] = t
    out["logit_scale"] = jnp.exp(t)
    out["logit_bias"] = b
    return zimg, ztxt, out


def tower_dims(cfg) -> tuple[int, int, int, int, int | None]:
  """``(width, depth, mlp_dim, num_heads, patch)`` of a tower config: the variant's
  values unless overridden (0 = from the variant); patch is None when not given."""
  (width, depth, mlp, heads), patch = vit.parse_variant(cfg.variant)
  # A text tower config has no patch_size: .get for that key only.
  return (cfg.width or width, cfg.depth or depth, cfg.mlp_dim or mlp, cfg.num_heads or heads,
          cfg.get("patch_size", 0) or patch)


def build_image_tower(mcfg) -> vit.ViT:
  icfg = mcfg.image
  width, depth, mlp, heads, patch = tower_dims(icfg)
  patch = patch or 16
  return vit.ViT(
      width=width, depth=depth, mlp_dim=mlp, num_heads=heads, patch_size=patch,
      embed_dim=(mcfg.embed_dim or None) if icfg.proj else None,
      pool=icfg.pool, posemb=icfg.posemb, ln_pre=icfg.ln_pre,
      final_ln_after_pool=icfg.final_ln_after_pool, patch_bias=icfg.patch_bias,
      proj_bias=icfg.proj_bias, act=icfg.act, ln_eps=icfg.ln_eps,
      dtype=common.to_dtype(mcfg.dtype), param_dtype=common.to_dtype(mcfg.param_dtype),
      attn_impl=mcfg.attn_impl or None, scan_layers=mcfg.scan_layers, remat=mcfg.remat,
      stem=tuple(int(c) for c in icfg.stem or ()))


def build_text_tower(mcfg) -> text.TextTower:
  tcfg = mcfg.text
  width, depth, mlp, heads, _ = tower_dims(tcfg)
  return text.TextTower(
      vocab_size=tcfg.vocab_size, width=width, depth=depth, mlp_dim=mlp, num_heads=heads,
      max_len=tcfg.max_len,
      embed_dim=(mcfg.embed_dim or None) if tcfg.proj else None,
      pool=tcfg.pool, causal=tcfg.causal, proj_bias=tcfg.proj_bias, act=tcfg.act,
      ln_eps=tcfg.ln_eps, pad_id=tcfg.pad_id,
      dtype=common.to_dtype(mcfg.dtype), param_dtype=common.to_dtype(mcfg.param_dtype),
      attn_impl=mcfg.attn_impl or None, scan_layers=mcfg.scan_layers, remat=mcfg.remat)


def build_model(mcfg) -> TwoTower:
  """Builds a `TwoTower` from ``config.model`` (every key in fszjax/config_defaults.py)."""
  bias = mcfg.logit_bias_init if mcfg.logit_bias else None
  return TwoTower(
      img=build_image_tower(mcfg), txt=build_text_tower(mcfg),
      logit_scale_init=mcfg.logit_scale_init, logit_bias_init=bias,
      logit_scale_max=mcfg.logit_scale_max or None)
