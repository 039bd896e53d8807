"""big_vision two-tower (SigLIP, LiT, CLIP-style) checkpoints -> fszjax.

    fszjax convert big_vision --weights siglip.npz --tokenizer c4_en.model --out DIR

Python: `convert(weights, out_dir, tokenizer=...)`, `infer_model_config(flat)`,
`import_params(flat, model_cfg)`.

The architecture is read from the array shapes: patch size, channels and width from
``img/embedding/kernel (p, p, C, D)``, image size from ``img/pos_embedding (1, N, D)``
(``sqrt(N) * p``), depth from the number of ``encoderblock_{i}`` (or the leading axis of a
scanned ``encoderblock``), heads from the query kernel ``(D, H, D/H)``, MLP width from
``MlpBlock_0/Dense_0/kernel (D, M)``, pooling from ``MAPHead_0`` / ``cls``, projections and
embedding size from ``head/kernel (D, E)``, the text vocabulary and length from
``txt/Embed_0/embedding (V, D)`` and ``txt/pos_embedding (1, L, D)``. What the shapes cannot
tell is an option: text pooling (SigLIP: "last"), activation (big_vision's ``nn.gelu`` is
the tanh approximation), LayerNorm eps (flax's 1e-6).

Mapping (per tower T in img/txt; ``Transformer`` is ``Encoder_0`` in the text tower):
  T/Transformer/encoderblock_{i}/LayerNorm_0, LayerNorm_1    -> T/encoder/block_i/ln_1, ln_2
  .../MultiHeadDotProductAttention_0/{query,key,value,out}  -> .../attn/{...} (same shapes)
  .../MlpBlock_0/Dense_0, Dense_1                           -> .../mlp/fc1, fc2
  T/Transformer/encoder_norm                                -> img/ln_post, txt/ln_final
  img/embedding, img/pos_embedding, img/cls                 -> same names (cls gets no
                                                               position: a zero row is added)
  img/MAPHead_0/{probe, MultiHeadDotProductAttention_0,
                 LayerNorm_0, MlpBlock_0}                   -> img/map_head/{probe, attn, ln, mlp}
  T/head                                                    -> T/head (kernel, bias)
  txt/Embed_0/embedding                                     -> txt/token_embedding/embedding
  t (1,), b (1,)                                            -> logit_scale, logit_bias (scalars)
"""

from __future__ import annotations

import math
import os
import re

import ml_collections
import numpy as np

from fszjax import text
from fszjax.convert import common, open_clip as oc
from fszjax.convert.common import ConvertError, Flat

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

_BLOCK_MAP = (
    ("LayerNorm_0/", "ln_1/"), ("LayerNorm_1/", "ln_2/"),
    ("MultiHeadDotProductAttention_0/", "attn/"),
    ("MlpBlock_0/Dense_0/", "mlp/fc1/"), ("MlpBlock_0/Dense_1/", "mlp/fc2/"),
)
_MAP_MAP = (
    ("probe", "probe"), ("MultiHeadDotProductAttention_0/", "attn/"), ("LayerNorm_0/", "ln/"),
    ("MlpBlock_0/Dense_0/", "mlp/fc1/"), ("MlpBlock_0/Dense_1/", "mlp/fc2/"),
)


def load_params(path: str) -> Flat:
  """The model params of a big_vision .npz as ``{"img/...": array}`` (``params/`` prefix
  and non-param entries such as optimizer state dropped)."""
  raw = common.read_weights(path)
  if any(k.startswith("params/") for k in raw):
    raw = {k[len("params/"):]: v for k, v in raw.items() if k.startswith("params/")}
  flat = {k: v for k, v in raw.items() if k.split("/")[0] in ("img", "txt", "t", "b")}
  if "img/embedding/kernel" not in flat or "txt/Embed_0/embedding" not in flat:
    some = sorted(raw)[:3]
    raise ConvertError(f"{path} is not a big_vision two-tower checkpoint (no img/embedding/kernel "
                       f"or txt/Embed_0/embedding; it has e.g. {some}); pass the SigLIP/LiT .npz")
  return flat


def _blocks(flat: Flat, prefix: str) -> tuple[int, bool]:
  """``(depth, scanned)`` of the encoder under ``prefix`` (e.g. "img/Transformer/")."""
  scanned_key = prefix + "encoderblock/LayerNorm_0/scale"
  if scanned_key in flat:
    return int(flat[scanned_key].shape[0]), True
  pat = re.compile(re.escape(prefix) + r"encoderblock_(\d+)/")
  idx = {int(m.group(1)) for m in map(pat.match, flat) if m}
  if not idx or idx != set(range(len(idx))):
    raise ConvertError(f"no consecutive {prefix}encoderblock_<i> params found (got {sorted(idx)}); "
                       "pass a complete big_vision checkpoint")
  return len(idx), False


def _block0(flat: Flat, prefix: str, scanned: bool, rest: str) -> np.ndarray:
  if scanned:
    return flat[f"{prefix}encoderblock/{rest}"][0]
  return flat[f"{prefix}encoderblock_0/{rest}"]


def infer_model_config(flat: Flat, *, image_size: int | None = None, text_pool: str = "last",
                       act: str = "gelu_tanh", ln_eps: float = 1e-6, image_pool: str | None = None):
  """``config.model`` for the params in ``flat`` (see the module docstring for what is
  read from which shape)."""

  k = flat["img/embedding/kernel"]
  if k.ndim != 4 or k.shape[0] != k.shape[1]:
    raise ConvertError(f"img/embedding/kernel has shape {k.shape}; expected (p, p, C, D) with "
                       "square patches")
  patch, channels, width = int(k.shape[0]), int(k.shape[2]), int(k.shape[3])
  pool = image_pool or ("map" if "img/MAPHead_0/probe" in flat else
                        "tok" if "img/cls" in flat else "gap")
  posemb = "learn" if "img/pos_embedding" in flat else "sincos2d"
  if posemb == "learn":
    n = int(flat["img/pos_embedding"].shape[1])
    side = math.isqrt(n)
    if side * side != n:
      raise ConvertError(f"img/pos_embedding has {n} positions, not a square grid; only square "
                         "images are supported")
    inferred = side * patch
    if image_size and image_size != inferred:
      raise ConvertError(f"--image_size {image_size} does not match img/pos_embedding "
                         f"({side}x{side} patches of {patch} = {inferred}); drop --image_size")
    image_size = inferred
  image_size = int(image_size or 224)

  def tower(prefix: str):
    depth, scanned = _blocks(flat, prefix)
    q = _block0(flat, prefix, scanned, "MultiHeadDotProductAttention_0/query/kernel")
    mlp = _block0(flat, prefix, scanned, "MlpBlock_0/Dense_0/kernel")
    return depth, int(q.shape[1]), int(mlp.shape[1]), scanned

  idepth, iheads, imlp, _ = tower("img/Transformer/")
  emb = flat["txt/Embed_0/embedding"]
  vocab, twidth = int(emb.shape[0]), int(emb.shape[1])
  if "txt/pos_embedding" not in flat:
    raise ConvertError("txt/pos_embedding is missing; pass a complete big_vision checkpoint")
  max_len = int(flat["txt/pos_embedding"].shape[1])
  tdepth, theads, tmlp, _ = tower("txt/Encoder_0/")
  img_e = flat["img/head/kernel"].shape[1] if "img/head/kernel" in flat else None
  txt_e = flat["txt/head/kernel"].shape[1] if "txt/head/kernel" in flat else None
  out_img, out_txt = img_e or width, txt_e or twidth
  if out_img != out_txt:
    raise ConvertError(f"image embeddings have size {out_img} but text embeddings {out_txt}; "
                       "the towers of this checkpoint are not comparable")
  if text_pool not in ("last", "first"):
    raise ConvertError(f"--text_pool {text_pool!r} is not supported; big_vision's 'last' or 'first'")

  m = ml_collections.ConfigDict()
  m.embed_dim = int(img_e or txt_e or 0)
  m.dtype, m.param_dtype, m.attn_impl = "float32", "float32", ""
  m.scan_layers, m.remat = False, "none"
  m.logit_scale_init = 10.0
  m.logit_scale_max = 0.0  # no clamp: big_vision uses exp(t) as is
  m.logit_bias = "b" in flat
  m.logit_bias_init = -10.0
  m.image = ml_collections.ConfigDict(dict(
      variant="B", width=width, depth=idepth, mlp_dim=imlp, num_heads=iheads, patch_size=patch,
      image_size=image_size, channels=channels, pool=pool, posemb=posemb, ln_pre=False,
      final_ln_after_pool=False, patch_bias="img/embedding/bias" in flat, proj=img_e is not None,
      proj_bias="img/head/bias" in flat, act=act, ln_eps=ln_eps, stem=()))
  m.text = ml_collections.ConfigDict(dict(
      variant="B", width=twidth, depth=tdepth, mlp_dim=tmlp, num_heads=theads, vocab_size=vocab,
      max_len=max_len, pool=text_pool, causal=False, proj=txt_e is not None,
      proj_bias="txt/head/bias" in flat, act=act, ln_eps=ln_eps, pad_id=0))
  return m


def _take(flat: Flat, used: set, key: str) -> np.ndarray:
  used.add(key)
  return flat[key]


def _import_encoder(flat: Flat, used: set, src: str, dst: str, out: Flat) -> None:
  depth, scanned = _blocks(flat, src)
  for k in [k for k in flat if k.startswith(src + ("encoderblock/" if scanned else "encoderblock_"))]:
    rest = k[len(src):]
    if scanned:
      rest = rest[len("encoderblock/"):]
      layers = [(i, flat[k][i]) for i in range(depth)]
    else:
      i_str, rest = rest[len("encoderblock_"):].split("/", 1)
      layers = [(int(i_str), flat[k])]
    for a, b in _BLOCK_MAP:
      if rest.startswith(a):
        for i, arr in layers:
          out[f"{dst}/encoder/block_{i}/{b}{rest[len(a):]}"] = arr
        used.add(k)
        break


def import_params(flat: Flat, model_cfg) -> Flat:
  """big_vision flat params -> fszjax flat params (unscanned). Every big_vision param must
  find a place; the first that does not is named."""
  used: set = set()
  out: Flat = {}
  out["img/embedding/kernel"] = _take(flat, used, "img/embedding/kernel")
  if "img/embedding/bias" in flat:
    out["img/embedding/bias"] = _take(flat, used, "img/embedding/bias")
  d = out["img/embedding/kernel"].shape[-1]
  if "img/pos_embedding" in flat:
    pe = _take(flat, used, "img/pos_embedding")
    if model_cfg.image.pool == "tok":  # big_vision adds positions before the class token
      pe = np.concatenate([np.zeros((1, 1, d), pe.dtype), pe], axis=1)
    out["img/pos_embedding"] = pe
  if model_cfg.image.pool == "tok":
    out["img/cls"] = _take(flat, used, "img/cls")
  _import_encoder(flat, used, "img/Transformer/", "img", out)
  out["img/ln_post/scale"] = _take(flat, used, "img/Transformer/encoder_norm/scale")
  out["img/ln_post/bias"] = _take(flat, used, "img/Transformer/encoder_norm/bias")
  for k in [k for k in flat if k.startswith("img/MAPHead_0/")]:
    rest = k[len("img/MAPHead_0/"):]
    for a, b in _MAP_MAP:
      if rest.startswith(a):
        out[f"img/map_head/{b}{rest[len(a):]}"] = _take(flat, used, k)
        break
  for t in ("img", "txt"):
    for p in ("kernel", "bias"):
      if f"{t}/head/{p}" in flat:
        out[f"{t}/head/{p}"] = _take(flat, used, f"{t}/head/{p}")
  out["txt/token_embedding/embedding"] = _take(flat, used, "txt/Embed_0/embedding")
  out["txt/pos_embedding"] = _take(flat, used, "txt/pos_embedding")
  _import_encoder(flat, used, "txt/Encoder_0/", "txt", out)
  out["txt/ln_final/scale"] = _take(flat, used, "txt/Encoder_0/encoder_norm/scale")
  out["txt/ln_final/bias"] = _take(flat, used, "txt/Encoder_0/encoder_norm/bias")
  out["logit_scale"] = np.asarray(_take(flat, used, "t")).reshape(()) if "t" in flat else np.asarray(
      math.log(10.0), np.float32)
  if "b" in flat:
    out["logit_bias"] = np.asarray(_take(flat, used, "b")).reshape(())
  left = [k for k in flat if k not in used]
  if left:
    raise ConvertError(f"big_vision param {left[0]} {tuple(flat[left[0]].shape)} has no fszjax "
                       "equivalent (this architecture option is not supported)")
  return out


def fszjax_config(model_cfg, tokenizer_path: str, *, eos: str = "sticky", pad_value: int = 1,
                  clean: str = "canonicalize"):
  """The full fszjax config of an imported big_vision model."""

  cfg = common.base_config()
  cfg.name = "big_vision"
  cfg.model = model_cfg
  cfg.loss = "siglip" if model_cfg.logit_bias else "clip"
  c = model_cfg.image.channels
  cfg.data = common.converted_data_config(
      model_cfg.image.image_size, SIGLIP_MEAN[:c], SIGLIP_STD[:c], model_cfg.text.max_len,
      dict(kind="big_vision", path=tokenizer_path, vocab_size=model_cfg.text.vocab_size, eos=eos,
           pad_value=int(pad_value), clean=clean),
      templates=oc.CLIP_TEMPLATES)
  cfg.data.channels = c
  cfg.eval.splits = tuple(cfg.data.eval_splits)
  cfg.inference = common.inference_section("squash", "bilinear", "big_vision")
  return cfg


def convert(weights: str, out_dir: str, *, tokenizer: str | None = None, image_size: int | None = None,
            text_pool: str = "last", act: str = "gelu_tanh", text_eos: str = "sticky",
            text_pad: int = 1, text_clean: str = "canonicalize", scan_layers: bool = False,
            overwrite: bool = False) -> str:
  """Converts a big_vision two-tower .npz (+ its SentencePiece .model) to a fszjax
  directory. Returns the output directory."""

  tok = None
  if tokenizer:
    tok = text.BigVisionTokenizer.from_file(tokenizer, eos=text_eos, pad_value=text_pad,
                                                  clean=text_clean)
  flat = load_params(weights)
  model_cfg = infer_model_config(flat, image_size=image_size, text_pool=text_pool, act=act)
  if tok is not None and tok.vocab_size > model_cfg.text.vocab_size:
    raise ConvertError(f"tokenizer {tokenizer} has {tok.vocab_size} pieces but the text tower "
                       f"embeds {model_cfg.text.vocab_size}; pass the checkpoint's own .model")
  params = import_params(flat, model_cfg)
  out_abs = os.path.abspath(os.path.expanduser(out_dir))
  tok_name = os.path.basename(tokenizer) if tokenizer else ""
  tok_path = os.path.join(out_abs, "tokenizer", tok_name) if tokenizer else ""
  cfg = fszjax_config(model_cfg, tok_path, eos=text_eos, pad_value=text_pad, clean=text_clean)
  cfg.model.scan_layers = bool(scan_layers)
  params = common.fit_to_model(params, cfg, "big_vision checkpoint")
  extra = {os.path.join("tokenizer", tok_name): tok.save} if tok is not None else {}
  return common.save_converted(out_abs, cfg, params, extra, overwrite=overwrite)
