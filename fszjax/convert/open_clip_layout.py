"""open_clip ``CLIP.state_dict()`` layouts: the supported tower options, the shapes of a
model's state dict, and the mapping of its weights to fszjax params and back (the table is
in `fszjax.convert.open_clip`'s docstring).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fszjax.convert import common
from fszjax.convert.common import ConvertError, Flat

_VISION_DEFAULTS = dict(head_width=64, mlp_ratio=4.0, patch_size=16, image_size=224,
                        no_ln_pre=False, pool_type="tok", final_ln_after_pool=False)
_TEXT_DEFAULTS = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12,
                      mlp_ratio=4.0, pool_type="argmax", proj_bias=False, proj_type="linear",
                      no_causal_mask=False, pad_id=0)
# Options that change the computation and have no fszjax equivalent (value = the neutral one).
_UNSUPPORTED = dict(
    ls_init_value=None, attentional_pool=False, embed_cls=False, pos_embed_type="learnable",
    timm_model_name=None, hf_model_name=None, block_type=None, qk_norm=False,
    scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False, scale_attn=False,
    scale_fc=False, input_patchnorm=False)


def supported_towers(name: str, cfg: Mapping) -> tuple[dict, dict]:
  v = {**_VISION_DEFAULTS, **cfg["vision_cfg"]}
  t = {**_TEXT_DEFAULTS, **cfg["text_cfg"]}
  for tower_name, tower in (("vision_cfg", v), ("text_cfg", t)):
    for k, neutral in _UNSUPPORTED.items():
      val = tower.get(k, neutral)
      if val == neutral or val is None or val is False or (k == "block_type" and val == "default"):
        continue
      raise ConvertError(f"open_clip model {name}: {tower_name}.{k}={val!r} is not supported "
                         "by fszjax's towers; use a plain ViT CLIP model")
  if isinstance(v["layers"], (list, tuple)):
    raise ConvertError(f"open_clip model {name} has a ResNet image tower; only ViT towers convert")
  for k in ("image_size", "patch_size"):
    if isinstance(v[k], (list, tuple)):
      if len(set(v[k])) != 1:
        raise ConvertError(f"open_clip model {name}: non-square vision {k}={v[k]} is not supported")
      v[k] = v[k][0]
  if v["pool_type"] != "tok":
    raise ConvertError(f"open_clip model {name}: vision pool_type={v['pool_type']!r} is not "
                       "supported (fszjax matches open_clip's class-token pooling only)")
  if t["pool_type"] not in ("argmax", "last", "first"):
    raise ConvertError(f"open_clip model {name}: text pool_type={t['pool_type']!r} is not "
                       "supported; use argmax, last or first")
  if v["width"] % v["head_width"] or t["width"] % t["heads"]:
    raise ConvertError(f"open_clip model {name}: a width is not divisible by its heads")
  return v, t



# ----------------------------------------------------------------------------- layouts


def state_dict_shapes(oc_cfg: Mapping, name: str = "custom") -> dict[str, tuple[int, ...]]:
  """``{key: shape}`` of the open_clip ``CLIP.state_dict()`` for `oc_cfg` (in its order)."""
  v, t = supported_towers(name, oc_cfg)
  e = int(oc_cfg["embed_dim"])
  d, p, size = int(v["width"]), int(v["patch_size"]), int(v["image_size"])
  out: dict[str, tuple[int, ...]] = {}
  tw = int(t["width"])
  out["positional_embedding"] = (int(t["context_length"]), tw)
  if t["proj_type"] != "none" and not t["proj_bias"]:
    out["text_projection"] = (tw, e)
  out["logit_scale"] = ()
  if oc_cfg.get("init_logit_bias", None) is not None:
    out["logit_bias"] = ()
  out["visual.class_embedding"] = (d,)
  out["visual.positional_embedding"] = ((size // p) ** 2 + 1, d)
  out["visual.proj"] = (d, e)
  out["visual.conv1.weight"] = (d, 3, p, p)
  if not v["no_ln_pre"]:
    out["visual.ln_pre.weight"] = out["visual.ln_pre.bias"] = (d,)
  _blocks_shapes(out, "visual.transformer", int(v["layers"]), d, int(d * float(v["mlp_ratio"])))
  out["visual.ln_post.weight"] = out["visual.ln_post.bias"] = (d,)
  _blocks_shapes(out, "transformer", int(t["layers"]), tw, int(tw * float(t["mlp_ratio"])))
  out["token_embedding.weight"] = (int(t["vocab_size"]), tw)
  out["ln_final.weight"] = out["ln_final.bias"] = (tw,)
  if t["proj_type"] != "none" and t["proj_bias"]:
    out["text_projection.weight"], out["text_projection.bias"] = (e, tw), (e,)
  return out


def _blocks_shapes(out, prefix, depth, d, m):
  for i in range(depth):
    b = f"{prefix}.resblocks.{i}."
    out[b + "ln_1.weight"] = out[b + "ln_1.bias"] = (d,)
    out[b + "attn.in_proj_weight"], out[b + "attn.in_proj_bias"] = (3 * d, d), (3 * d,)
    out[b + "attn.out_proj.weight"], out[b + "attn.out_proj.bias"] = (d, d), (d,)
    out[b + "ln_2.weight"] = out[b + "ln_2.bias"] = (d,)
    out[b + "mlp.c_fc.weight"], out[b + "mlp.c_fc.bias"] = (m, d), (m,)
    out[b + "mlp.c_proj.weight"], out[b + "mlp.c_proj.bias"] = (d, m), (d,)


def normalize_state_dict(sd: Mapping[str, np.ndarray]) -> Flat:
  """Drops non-weight entries and maps custom-text keys (``text.*``) to CLIP's layout."""
  out = {}
  for k, val in sd.items():
    if k in common.IGNORED_KEYS or k.endswith(".attn_mask"):
      continue
    if k.startswith("text."):
      k = k[len("text."):]
    out[k] = val
  return out


def check_state_dict(sd: Mapping[str, np.ndarray], oc_cfg: Mapping, name: str) -> None:
  """Raises naming the first tensor (in the file's order) whose name or shape does not fit
  `oc_cfg`, then the first missing one."""
  want = state_dict_shapes(oc_cfg, name)
  fix = "pass the --model (or --model_config) the weights were trained with"
  for k, val in sd.items():
    shape = tuple(np.shape(val))
    if k not in want:
      raise ConvertError(f"weights do not match {name}: {k} {shape} is not a tensor of {name}; {fix}")
    if shape != want[k] and not (k in ("logit_scale", "logit_bias") and int(np.prod(shape)) == 1):
      raise ConvertError(f"weights do not match {name}: {k} has shape {shape} but {name} expects "
                         f"{want[k]}; {fix}")
  missing = [k for k in want if k not in sd]
  if missing:
    raise ConvertError(f"weights do not match {name}: {missing[0]} {want[missing[0]]} is missing "
                       f"({len(missing)} tensors missing); {fix}")


_MLP_NAMES = (("c_fc", "fc1"), ("c_proj", "fc2"))


def _ln_in(out: Flat, dst: str, sd: Flat, src: str) -> None:
  out[dst + "/scale"], out[dst + "/bias"] = sd[src + ".weight"], sd[src + ".bias"]


def _ln_out(out: dict, dst: str, flat: Flat, src: str) -> None:
  out[dst + ".weight"], out[dst + ".bias"] = flat[src + "/scale"], flat[src + "/bias"]


def _import_blocks(sd: Flat, src: str, dst: str, depth: int, heads: int, out: Flat) -> None:
  for i in range(depth):
    s, o = f"{src}.resblocks.{i}.", f"{dst}/encoder/block_{i}/"
    w, b = sd[s + "attn.in_proj_weight"], sd[s + "attn.in_proj_bias"]
    d = w.shape[1]
    dh = d // heads
    for j, n in enumerate(("query", "key", "value")):
      out[o + f"attn/{n}/kernel"] = w[j * d:(j + 1) * d].T.reshape(d, heads, dh)
      out[o + f"attn/{n}/bias"] = b[j * d:(j + 1) * d].reshape(heads, dh)
    out[o + "attn/out/kernel"] = sd[s + "attn.out_proj.weight"].T.reshape(heads, dh, d)
    out[o + "attn/out/bias"] = sd[s + "attn.out_proj.bias"]
    for ln in ("ln_1", "ln_2"):
      _ln_in(out, o + ln, sd, s + ln)
    for oc_name, fz_name in _MLP_NAMES:
      out[o + f"mlp/{fz_name}/kernel"] = sd[s + f"mlp.{oc_name}.weight"].T
      out[o + f"mlp/{fz_name}/bias"] = sd[s + f"mlp.{oc_name}.bias"]


def import_state_dict(sd: Mapping[str, np.ndarray], oc_cfg: Mapping, name: str = "custom") -> Flat:
  """open_clip state dict -> fszjax flat params ``{"img/...": array}`` (unscanned layout,
  source dtypes; see the module docstring for the mapping)."""
  sd = normalize_state_dict(sd)
  check_state_dict(sd, oc_cfg, name)
  v, t = supported_towers(name, oc_cfg)
  out: Flat = {}
  out["img/embedding/kernel"] = sd["visual.conv1.weight"].transpose(2, 3, 1, 0)
  out["img/cls"] = sd["visual.class_embedding"].reshape(1, 1, -1)
  out["img/pos_embedding"] = sd["visual.positional_embedding"][None]
  if not v["no_ln_pre"]:
    _ln_in(out, "img/ln_pre", sd, "visual.ln_pre")
  _import_blocks(sd, "visual.transformer", "img", int(v["layers"]),
                 int(v["width"]) // int(v["head_width"]), out)
  _ln_in(out, "img/ln_post", sd, "visual.ln_post")
  out["img/head/kernel"] = sd["visual.proj"]
  out["txt/token_embedding/embedding"] = sd["token_embedding.weight"]
  out["txt/pos_embedding"] = sd["positional_embedding"][None]
  _import_blocks(sd, "transformer", "txt", int(t["layers"]), int(t["heads"]), out)
  _ln_in(out, "txt/ln_final", sd, "ln_final")
  if "text_projection" in sd:
    out["txt/head/kernel"] = sd["text_projection"]
  elif "text_projection.weight" in sd:
    out["txt/head/kernel"] = sd["text_projection.weight"].T
    out["txt/head/bias"] = sd["text_projection.bias"]
  out["logit_scale"] = np.asarray(sd["logit_scale"]).reshape(())
  if "logit_bias" in sd:
    out["logit_bias"] = np.asarray(sd["logit_bias"]).reshape(())
  return out


def _export_blocks(flat: Flat, src: str, dst: str, depth: int, out: dict) -> None:
  for i in range(depth):
    s, o = f"{src}/encoder/block_{i}/", f"{dst}.resblocks.{i}."
    qkv = [flat[s + f"attn/{n}/kernel"] for n in ("query", "key", "value")]
    d = qkv[0].shape[0]
    _ln_out(out, o + "ln_1", flat, s + "ln_1")
    out[o + "attn.in_proj_weight"] = np.concatenate([k.reshape(d, -1).T for k in qkv])
    out[o + "attn.in_proj_bias"] = np.concatenate(
        [flat[s + f"attn/{n}/bias"].reshape(-1) for n in ("query", "key", "value")])
    out[o + "attn.out_proj.weight"] = flat[s + "attn/out/kernel"].reshape(-1, d).T
    out[o + "attn.out_proj.bias"] = flat[s + "attn/out/bias"]
    _ln_out(out, o + "ln_2", flat, s + "ln_2")
    for oc_name, fz_name in _MLP_NAMES:
      out[o + f"mlp.{oc_name}.weight"] = flat[s + f"mlp/{fz_name}/kernel"].T
      out[o + f"mlp.{oc_name}.bias"] = flat[s + f"mlp/{fz_name}/bias"]


def export_state_dict(flat: Mapping[str, np.ndarray], oc_cfg: Mapping) -> dict[str, np.ndarray]:
  """fszjax flat params (scanned or not) -> open_clip ``CLIP.state_dict()`` arrays
  (contiguous, the params' dtype). Inverse of `import_state_dict`."""
  flat = common.unstack_blocks({k: np.asarray(val) for k, val in flat.items()})
  v, t = supported_towers("export", oc_cfg)
  out: dict[str, np.ndarray] = {}
  out["positional_embedding"] = flat["txt/pos_embedding"][0]
  if "txt/head/kernel" in flat and "txt/head/bias" not in flat:
    out["text_projection"] = flat["txt/head/kernel"]
  out["logit_scale"] = flat["logit_scale"].reshape(())
  if "logit_bias" in flat:
    out["logit_bias"] = flat["logit_bias"].reshape(())
  out["visual.class_embedding"] = flat["img/cls"].reshape(-1)
  out["visual.positional_embedding"] = flat["img/pos_embedding"][0]
  out["visual.proj"] = flat["img/head/kernel"]
  out["visual.conv1.weight"] = flat["img/embedding/kernel"].transpose(3, 2, 0, 1)
  if "img/ln_pre/scale" in flat:
    _ln_out(out, "visual.ln_pre", flat, "img/ln_pre")
  _export_blocks(flat, "img", "visual.transformer", int(v["layers"]), out)
  _ln_out(out, "visual.ln_post", flat, "img/ln_post")
  _export_blocks(flat, "txt", "transformer", int(t["layers"]), out)
  out["token_embedding.weight"] = flat["txt/token_embedding/embedding"]
  _ln_out(out, "ln_final", flat, "txt/ln_final")
  if "txt/head/bias" in flat:
    out["text_projection.weight"] = flat["txt/head/kernel"].T
    out["text_projection.bias"] = flat["txt/head/bias"]
  out = {k: np.ascontiguousarray(val) for k, val in out.items()}
  check_state_dict(out, oc_cfg, "the exported config")
  return out
