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
  return (cfg.get("width", 0) or width, cfg.get("depth", 0) or depth,
          cfg.get("mlp_dim", 0) or mlp, cfg.get("num_heads", 0) or heads,
          cfg.get("patch_size", 0) or patch)


def build_image_tower(mcfg) -> vit.ViT:
  icfg = mcfg.image
  width, depth, mlp, heads, patch = tower_dims(icfg)
  patch = patch or 16
  return vit.ViT(
      width=width, depth=depth, mlp_dim=mlp, num_heads=heads, patch_size=patch,
      embed_dim=(mcfg.embed_dim or None) if icfg.get("proj", True) else None,
      pool=icfg.get("pool", "map"), posemb=icfg.get("posemb", "learn"),
      ln_pre=icfg.get("ln_pre", False), final_ln_after_pool=icfg.get("final_ln_after_pool", False),
      patch_bias=icfg.get("patch_bias", True), proj_bias=icfg.get("proj_bias", False),
      act=icfg.get("act", "gelu"), ln_eps=icfg.get("ln_eps", 1e-6),
      dtype=common.to_dtype(mcfg.get("dtype", "float32")),
      param_dtype=common.to_dtype(mcfg.get("param_dtype", "float32")),
      attn_impl=mcfg.get("attn_impl", None) or None,
      scan_layers=mcfg.get("scan_layers", False), remat=mcfg.get("remat", "none"),
      stem=tuple(int(c) for c in icfg.get("stem", ()) or ()))


def build_text_tower(mcfg) -> text.TextTower:
  tcfg = mcfg.text
  width, depth, mlp, heads, _ = tower_dims(tcfg)
  return text.TextTower(
      vocab_size=tcfg.vocab_size, width=width, depth=depth, mlp_dim=mlp, num_heads=heads,
      max_len=tcfg.max_len,
      embed_dim=(mcfg.embed_dim or None) if tcfg.get("proj", True) else None,
      pool=tcfg.get("pool", "eot"), causal=tcfg.get("causal", True),
      proj_bias=tcfg.get("proj_bias", False), act=tcfg.get("act", "gelu"),
      ln_eps=tcfg.get("ln_eps", 1e-6), pad_id=tcfg.get("pad_id", 0),
      dtype=common.to_dtype(mcfg.get("dtype", "float32")),
      param_dtype=common.to_dtype(mcfg.get("param_dtype", "float32")),
      attn_impl=mcfg.get("attn_impl", None) or None,
      scan_layers=mcfg.get("scan_layers", False), remat=mcfg.get("remat", "none"))


def build_model(mcfg) -> TwoTower:
  """Builds a `TwoTower` from ``config.model`` (see configs/glyphs.py for the keys)."""
  bias = mcfg.get("logit_bias_init", None) if mcfg.get("logit_bias", False) else None
  return TwoTower(
      img=build_image_tower(mcfg), txt=build_text_tower(mcfg),
      logit_scale_init=mcfg.get("logit_scale_init", 10.0), logit_bias_init=bias,
      logit_scale_max=mcfg.get("logit_scale_max", 100.0) or None)
