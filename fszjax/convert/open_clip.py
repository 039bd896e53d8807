"""open_clip <-> fszjax: import open_clip ViT CLIP weights, export fszjax CLIP-style models.

    fszjax convert open_clip --model ViT-B-32 --weights open_clip_model.safetensors --out DIR
    fszjax convert to_open_clip --workdir RUN --out RUN/open_clip/open_clip_model.safetensors

Python: `convert(model, weights, out_dir)`, `import_state_dict(sd, oc_cfg)`,
`export_workdir(workdir, out)`, `export_state_dict(flat_params, oc_cfg)`.

Architectures are described by open_clip model config dicts (``{"embed_dim", "quick_gelu",
"vision_cfg", "text_cfg"}``, the format of open_clip's ``model_configs/*.json``):
`MODEL_CONFIGS` has the ViT CLIP models by name, a ``-quickgelu`` suffix (or
``quick_gelu=True``) selects QuickGELU (OpenAI's original weights need it), and any other
plain-ViT config can be passed as a dict or JSON file.

Weight layout (open_clip ``CLIP.state_dict()``; custom-text models prefix the text keys with
``text.``), with D the width, H the heads, M the MLP width, E the embedding size:
  visual.conv1.weight (D, 3, p, p)        -> img/embedding/kernel (p, p, 3, D)
  visual.class_embedding (D,)             -> img/cls (1, 1, D)
  visual.positional_embedding (T, D)      -> img/pos_embedding (1, T, D)
  visual.ln_pre / ln_post                 -> img/ln_pre / img/ln_post
  visual.proj (D, E)                      -> img/head/kernel
  *.transformer.resblocks.{i}.
     ln_1, ln_2                           -> encoder/block_i/ln_1, ln_2 {scale, bias}
     attn.in_proj_weight (3D, D) [q;k;v]  -> attn/{query,key,value}/kernel (D, H, D/H)
     attn.in_proj_bias (3D,)              -> attn/{query,key,value}/bias (H, D/H)
     attn.out_proj.weight (D, D), bias    -> attn/out/kernel (H, D/H, D), bias
     mlp.c_fc.weight (M, D), bias         -> mlp/fc1/kernel (D, M), bias
     mlp.c_proj.weight (D, M), bias       -> mlp/fc2/kernel (M, D), bias
  token_embedding.weight (V, D)           -> txt/token_embedding/embedding
  positional_embedding (L, D)             -> txt/pos_embedding (1, L, D)
  ln_final                                -> txt/ln_final
  text_projection (D, E)                  -> txt/head/kernel  (a Linear with bias when
                                             text_cfg.proj_bias: weight (E, D) + bias)
  logit_scale (), logit_bias ()           -> logit_scale, logit_bias (log form, unchanged)

Semantics matched: class-token pooling, pre-transformer LayerNorm, LayerNorm eps 1e-5
(``norm_kwargs``), causal text mask, end-of-text pooling by argmax of the token ids (the
CLIP BPE's EOT 49407 is the highest id), GELU or QuickGELU.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Mapping

import ml_collections

from fszjax import checkpoint as ckpt_lib, inference
from fszjax.convert import common
from fszjax.convert.common import ConvertError
from fszjax.convert.open_clip_layout import (check_state_dict, export_state_dict,
                                             import_state_dict, normalize_state_dict,
                                             state_dict_shapes, supported_towers)
from fszjax.models.two_tower import build_image_tower, build_text_tower
from fszjax.text import clip_bpe

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a rendering of a {}.", "graffiti of a {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "a bright photo of a {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a pixelated photo of the {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a low resolution photo of a {}.", "a photo of a large {}.", "a photo of a small {}.",
    "itap of a {}.", "a origami {}.", "a plushie {}.", "a toy {}.", "a {} in a video game.",
)

# open_clip's ViT CLIP configs (model_configs/<name>.json). All have text context 77 and
# vocabulary 49408; vision head_width 64 and mlp_ratio 4 unless given.
#   name: (embed_dim, image_size, v_layers, v_width, v_head_width, v_mlp_ratio, patch,
#          t_width, t_heads, t_layers)
_VIT_TABLE = {
    "ViT-B-32": (512, 224, 12, 768, 64, 4.0, 32, 512, 8, 12),
    "ViT-B-32-256": (512, 256, 12, 768, 64, 4.0, 32, 512, 8, 12),
    "ViT-B-16": (512, 224, 12, 768, 64, 4.0, 16, 512, 8, 12),
    "ViT-B-16-plus-240": (640, 240, 12, 896, 64, 4.0, 16, 640, 10, 12),
    "ViT-L-14": (768, 224, 24, 1024, 64, 4.0, 14, 768, 12, 12),
    "ViT-L-14-336": (768, 336, 24, 1024, 64, 4.0, 14, 768, 12, 12),
    "ViT-H-14": (1024, 224, 32, 1280, 80, 4.0, 14, 1024, 16, 24),
    "ViT-H-14-378": (1024, 378, 32, 1280, 80, 4.0, 14, 1024, 16, 24),
    "ViT-g-14": (1024, 224, 40, 1408, 88, 4.3637, 14, 1024, 16, 24),
    "ViT-bigG-14": (1280, 224, 48, 1664, 104, 4.9231, 14, 1280, 20, 32),
}


def _table_config(row) -> dict:
  e, size, vl, vw, vhw, vmlp, p, tw, th, tl = row
  vision = dict(image_size=size, layers=vl, width=vw, patch_size=p)
  if vhw != 64:
    vision["head_width"] = vhw
  if vmlp != 4.0:
    vision["mlp_ratio"] = vmlp
  return dict(embed_dim=e, vision_cfg=vision,
              text_cfg=dict(context_length=77, vocab_size=49408, width=tw, heads=th, layers=tl))


MODEL_CONFIGS: dict[str, dict] = {n: _table_config(r) for n, r in _VIT_TABLE.items()}


def model_config(name_or_cfg: str | Mapping, quick_gelu: bool | None = None) -> tuple[str, dict]:
  """``(name, open_clip model config dict)`` from a model NAME (``-quickgelu`` suffix
  allowed), a JSON file path, or a dict (open_clip's ``open_clip_config.json`` with a
  ``model_cfg`` key works too). ``quick_gelu`` overrides the config's setting."""
  if isinstance(name_or_cfg, Mapping):
    name, cfg = "custom", copy.deepcopy(dict(name_or_cfg))
  elif str(name_or_cfg).endswith(".json"):
    path = str(name_or_cfg)
    if not os.path.isfile(path):
      raise ConvertError(f"open_clip model config {path} not found; pass --model NAME or an "
                         "existing --model_config JSON")
    with open(path) as f:
      cfg = json.load(f)
    name = os.path.splitext(os.path.basename(path))[0]
  else:
    name = str(name_or_cfg).replace("/", "-")
    base = name[:-len("-quickgelu")] if name.endswith("-quickgelu") else name
    if base not in MODEL_CONFIGS:
      raise ConvertError(f"unknown open_clip model {name!r}; use one of {sorted(MODEL_CONFIGS)} "
                         "(optionally with -quickgelu) or pass --model_config FILE.json")
    cfg = copy.deepcopy(MODEL_CONFIGS[base])
    if base != name:
      cfg["quick_gelu"] = True
  cfg = dict(cfg.get("model_cfg", cfg))
  for k in ("embed_dim", "vision_cfg", "text_cfg"):
    if k not in cfg:
      raise ConvertError(f"open_clip model config {name!r} has no {k!r}; pass an open_clip "
                         "model config (model_configs/*.json format)")
  if quick_gelu is not None:
    cfg["quick_gelu"] = bool(quick_gelu)
  return name, cfg


# ----------------------------------------------------------------------------- configs

def _act(cfg: Mapping, tower: Mapping) -> str:
  kw = dict(tower.get("act_kwargs") or {})
  if cfg.get("quick_gelu", False):
    if kw:
      raise ConvertError(f"act_kwargs {kw} with quick_gelu have no fszjax equivalent")
    return "quick_gelu"
  approx = kw.pop("approximate", "none")
  if kw or approx not in ("none", "tanh"):
    raise ConvertError(f"open_clip act_kwargs {tower.get('act_kwargs')} are not supported; "
                       "fszjax has GELU (exact or tanh) and QuickGELU")
  return "gelu_tanh" if approx == "tanh" else "gelu"


def _eps(tower: Mapping) -> float:
  kw = dict(tower.get("norm_kwargs") or {})
  eps = kw.pop("eps", 1e-5)
  if kw:
    raise ConvertError(f"open_clip norm_kwargs {tower.get('norm_kwargs')} are not supported; "
                       "only eps is")
  return float(eps)


def fszjax_model_config(oc_cfg: Mapping, name: str = "custom"):
  """The ``config.model`` section equivalent to an open_clip model config."""

  v, t = supported_towers(name, oc_cfg)
  width, heads = int(v["width"]), int(v["width"]) // int(v["head_width"])
  m = ml_collections.ConfigDict()
  m.embed_dim = int(oc_cfg["embed_dim"])
  m.dtype, m.param_dtype, m.attn_impl = "float32", "float32", ""
  m.scan_layers, m.remat = False, "none"
  m.logit_scale_init = float(math.exp(oc_cfg.get("init_logit_scale", math.log(1 / 0.07))))
  m.logit_scale_max = 100.0
  bias = oc_cfg.get("init_logit_bias", None)
  m.logit_bias = bias is not None
  m.logit_bias_init = float(bias) if bias is not None else -10.0
  m.image = ml_collections.ConfigDict(dict(
      variant="B", width=width, depth=int(v["layers"]), mlp_dim=int(width * float(v["mlp_ratio"])),
      num_heads=heads, patch_size=int(v["patch_size"]), image_size=int(v["image_size"]),
      channels=3, pool="tok", posemb="learn", ln_pre=not v["no_ln_pre"],
      final_ln_after_pool=bool(v["final_ln_after_pool"]), patch_bias=False, proj=True,
      proj_bias=False, act=_act(oc_cfg, v), ln_eps=_eps(v), stem=()))
  tw = int(t["width"])
  m.text = ml_collections.ConfigDict(dict(
      variant="B", width=tw, depth=int(t["layers"]), mlp_dim=int(tw * float(t["mlp_ratio"])),
      num_heads=int(t["heads"]), vocab_size=int(t["vocab_size"]), max_len=int(t["context_length"]),
      pool={"argmax": "eot", "last": "last", "first": "first"}[t["pool_type"]],
      causal=not t["no_causal_mask"], proj=t["proj_type"] != "none", proj_bias=bool(t["proj_bias"]),
      act=_act(oc_cfg, t), ln_eps=_eps(t), pad_id=int(t["pad_id"])))
  return m


def open_clip_model_config(model_cfg) -> dict:
  """The open_clip model config dict equivalent to a fszjax ``config.model`` (CLIP-style
  configs only; the error names the first option open_clip's ViT cannot express)."""

  img, txt = build_image_tower(model_cfg), build_text_tower(model_cfg)
  channels = model_cfg.image.channels
  problems = [
      (img.pool != "tok", f"image.pool={img.pool!r} (open_clip's ViT pools the class token)"),
      (img.posemb != "learn", f"image.posemb={img.posemb!r} (use 'learn')"),
      (img.patch_bias, "image.patch_bias=True (open_clip's conv1 has no bias)"),
      (img.embed_dim is None, "image.proj=False (open_clip's ViT always projects)"),
      (img.proj_bias, "image.proj_bias=True (open_clip's visual.proj has no bias)"),
      (channels != 3, f"image.channels={channels} (open_clip's ViT takes RGB)"),
      (txt.pool not in ("eot", "last", "first"), f"text.pool={txt.pool!r}"),
      (img.act != txt.act, "different image/text activations"),
      (img.act == "relu", "act='relu'"),
  ]
  for bad, what in problems:
    if bad:
      raise ConvertError(f"cannot export to open_clip: {what}; train a CLIP-style config "
                         "(see fszjax.convert.open_clip.fszjax_model_config)")

  def ratio(mlp: int, width: int) -> float:
    r = mlp / width
    return r if int(width * r) == mlp else (mlp + 0.5) / width

  vision = dict(image_size=int(model_cfg.image.image_size or 224), layers=img.depth,
                width=img.width, head_width=img.width // img.num_heads,
                mlp_ratio=ratio(img.mlp_dim, img.width), patch_size=img.patch_size)
  if not img.ln_pre:
    vision["no_ln_pre"] = True
  if img.final_ln_after_pool:
    vision["final_ln_after_pool"] = True
  text = dict(context_length=txt.max_len, vocab_size=txt.vocab_size, width=txt.width,
              heads=txt.num_heads, layers=txt.depth, mlp_ratio=ratio(txt.mlp_dim, txt.width))
  if txt.pool != "eot":
    text["pool_type"] = txt.pool
  if not txt.causal:
    text["no_causal_mask"] = True
  if txt.embed_dim is None:
    text["proj_type"] = "none"
  if txt.proj_bias:
    text["proj_bias"] = True
  if txt.pad_id:
    text["pad_id"] = txt.pad_id
  for tower, mod in ((vision, img), (text, txt)):
    if mod.ln_eps != 1e-5:
      tower["norm_kwargs"] = {"eps": mod.ln_eps}
    if mod.act == "gelu_tanh":
      tower["act_kwargs"] = {"approximate": "tanh"}
  out = dict(embed_dim=int(model_cfg.embed_dim), vision_cfg=vision, text_cfg=text)
  if img.act == "quick_gelu":
    out["quick_gelu"] = True
  if model_cfg.logit_bias:
    out["init_logit_bias"] = float(model_cfg.logit_bias_init)
  if txt.embed_dim is not None and txt.embed_dim != img.embed_dim:
    raise ConvertError("cannot export to open_clip: the towers' embedding sizes differ")
  return out


def builtin_name(oc_cfg: Mapping) -> str | None:
  """The open_clip built-in model name whose config equals `oc_cfg`, if any."""
  want = json.dumps(oc_cfg, sort_keys=True)
  for name, cfg in MODEL_CONFIGS.items():
    for qg in (False, True):
      c = dict(cfg, quick_gelu=True) if qg else cfg
      norm = json.loads(json.dumps(c))
      norm["vision_cfg"].setdefault("head_width", 64)
      norm["vision_cfg"].setdefault("mlp_ratio", 4.0)
      norm["text_cfg"].setdefault("mlp_ratio", 4.0)
      if json.dumps(norm, sort_keys=True) == want:
        return name + ("-quickgelu" if qg else "")
  return None


# ----------------------------------------------------------------------------- entry points


def fszjax_config(oc_cfg: Mapping, name: str, bpe_path: str):
  """The full fszjax config of an imported open_clip model (model + data sections)."""
  cfg = common.base_config()
  cfg.name = f"open_clip:{name}"
  cfg.model = fszjax_model_config(oc_cfg, name)
  cfg.loss = "siglip" if cfg.model.logit_bias else "clip"
  cfg.data = common.converted_data_config(
      cfg.model.image.image_size, OPENAI_MEAN, OPENAI_STD, cfg.model.text.max_len,
      dict(kind="clip_bpe", path=bpe_path, vocab_size=cfg.model.text.vocab_size),
      templates=CLIP_TEMPLATES)
  cfg.eval.splits = tuple(cfg.data.eval_splits)
  cfg.inference = common.inference_section("shortest", "bicubic", "open_clip", model=name)
  return cfg


def convert(model: str | Mapping, weights: str, out_dir: str, *, quick_gelu: bool | None = None,
            bpe_path: str | None = None, scan_layers: bool = False, overwrite: bool = False) -> str:
  """Converts open_clip weights (``.safetensors`` or a torch state dict read with
  ``weights_only=True``) to a fszjax directory (config.json + checkpoints/0 + the CLIP BPE
  vocabulary). ``model``: a name from `MODEL_CONFIGS` (``-quickgelu`` allowed), a JSON path
  or an open_clip model config dict. ``scan_layers`` writes the scanned block layout (for
  configs with ``model.scan_layers=True``). Returns the output directory."""

  name, oc_cfg = model_config(model, quick_gelu)
  fszjax_model_config(oc_cfg, name)  # unsupported options fail before reading weights
  tok = clip_bpe.ClipBpeTokenizer.from_file(bpe_path)
  sd = common.read_weights(weights)
  flat = import_state_dict(sd, oc_cfg, name)
  out_abs = os.path.abspath(os.path.expanduser(out_dir))
  cfg = fszjax_config(oc_cfg, name, os.path.join(out_abs, "tokenizer", clip_bpe.BPE_FILENAME))
  cfg.model.scan_layers = bool(scan_layers)
  flat = common.fit_to_model(flat, cfg, f"open_clip {name}")
  return common.save_converted(
      out_abs, cfg, flat, {os.path.join("tokenizer", clip_bpe.BPE_FILENAME): tok.save},
      overwrite=overwrite)


def export_workdir(workdir: str, out: str, *, overwrite: bool = False) -> dict[str, Any]:
  """Writes a fszjax model (workdir, converted directory or checkpoint) as open_clip weights.

  ``out`` is a ``.safetensors`` file or a directory (then ``open_clip_model.safetensors``);
  ``open_clip_config.json`` (``{"model_cfg", "preprocess_cfg"}``) is written beside it so
  ``open_clip.create_model("local-dir:" + dirname(out))`` loads the pair. Returns
  ``{"weights", "config", "model_cfg", "builtin"}`` (``builtin``: the open_clip model name
  with the same architecture, or None).
  """
  from safetensors.numpy import save_file  # safetensors: optional, only to write open_clip exports


  cfg, _ = inference.load_config(workdir)
  oc_cfg = open_clip_model_config(cfg.model)
  flat = common.flatten(ckpt_lib.load_params_numpy(workdir))
  sd = export_state_dict(flat, oc_cfg)
  out = os.path.abspath(os.path.expanduser(out))
  if not out.endswith(".safetensors"):
    out = os.path.join(out, "open_clip_model.safetensors")
  cfg_path = os.path.join(os.path.dirname(out), "open_clip_config.json")
  for path in (out, cfg_path):
    if os.path.exists(path) and not overwrite:
      raise ConvertError(f"{path} already exists; pass another --out or --overwrite")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  # The data section is free-form (a converted or old config may lack mean / std). fszjax's
  # own "center" resize is closest to open_clip's "shortest" (resize, then centre crop).
  inf = cfg.inference
  preprocess = dict(size=int(cfg.model.image.image_size or cfg.data.image_size),
                    mean=list(cfg.data.get("mean", OPENAI_MEAN)),
                    std=list(cfg.data.get("std", OPENAI_STD)),
                    interpolation=inf.interpolation,
                    resize_mode="shortest" if inf.resize_mode == "center" else inf.resize_mode)
  meta = {"format": "pt", "producer": "fszjax"}
  tmp = out + ".tmp"
  save_file(sd, tmp, metadata=meta)
  os.replace(tmp, out)
  with open(cfg_path + ".tmp", "w") as f:
    json.dump({"model_cfg": oc_cfg, "preprocess_cfg": preprocess}, f, indent=2)
  os.replace(cfg_path + ".tmp", cfg_path)
  return {"weights": out, "config": cfg_path, "model_cfg": oc_cfg, "builtin": builtin_name(oc_cfg)}
