"""Inference API: load a fszjax model and embed images and texts.

    import fszjax
    model = fszjax.load("runs/glyphs")              # workdir, checkpoint or converted dir
    x = model.preprocess([pil_image, uint8_array])  # (B, H, W, C) float32, normalised
    zimg = model.encode_image(x)                    # (B, E), L2-normalised
    ztxt = model.encode_text(model.tokenize(["a cat", "a dog"]))
    clf = model.zero_shot_classifier(["cat", "dog"], ["a photo of a {}."])  # (C, E)
    probs = model.classify(x, clf)                  # (B, C) softmax over the classes

The tokenizer follows the config: fszjax's SentencePiece tokenizer for fszjax workdirs
(`fszjax.data.vocab.get_tokenizer`, loaded on first use), the CLIP BPE for converted
open_clip models, the checkpoint's SentencePiece model used the big_vision way for
converted big_vision models (``config.data.tokenizer.kind``; see `fszjax.text`).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from fszjax import checkpoint as ckpt_lib, config as config_lib, evaluate, text
from fszjax.data import errors as data_errors, vocab
from fszjax.data.preprocess import resize
from fszjax.errors import UserError
from fszjax.fewshot import api
from fszjax.models.two_tower import build_model, TwoTower


class ImageInputError(UserError):
  """Images of the wrong shape for the model; the message names the expected one."""


class LoadError(UserError):
  """A path that is not a loadable fszjax model; the message names the fix."""


def load_config(path: str):
  """``(config, base_dir)`` of a workdir / converted dir / checkpoints dir / step dir.

  ``base_dir`` is the directory holding config.json (relative tokenizer paths resolve
  against it), or the step directory when only the checkpoint's own config exists.
  """

  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise LoadError(f"{path} does not exist; pass a fszjax workdir, a converted directory "
                    "(`fszjax convert ...`) or a checkpoint step directory")
  if not os.path.isdir(path):
    raise LoadError(f"{path} is a file, not a fszjax model; pass a fszjax workdir, a directory "
                    "written by `fszjax convert` (weights files go through `fszjax convert` "
                    "first) or a checkpoint step directory")
  candidates = [path]
  try:
    step_dir = ckpt_lib.resolve_step_dir(path)
  except ckpt_lib.CheckpointError:
    step_dir = None
  if step_dir is not None:
    candidates += [os.path.dirname(step_dir), os.path.dirname(os.path.dirname(step_dir))]
  for d in candidates:
    if os.path.isfile(os.path.join(d, "config.json")):
      return config_lib.load_config(os.path.join(d, "config.json")), d
  if step_dir is not None:
    for cand in (os.path.join(step_dir, "config", "metadata"), os.path.join(step_dir, "config")):
      if os.path.isfile(cand):
        with open(cand) as f:
          cfg = ml_collections.ConfigDict(json.load(f))
        config_lib.resolve_paths(cfg, step_dir)
        config_lib.fill_defaults(cfg)  # written before some keys existed
        return cfg, step_dir
  raise LoadError(f"no config.json next to {path}; pass the workdir (or the directory "
                  "`fszjax convert` wrote)")


def model_tokenizer(config, base_dir: str | None):
  """The tokenizer of a loaded model config: the file ``config.data.tokenizer.path`` names
  (relative to ``base_dir``, the directory of its config.json; pretraining workdirs and
  converted directories carry it in ``tokenizer/``), read the way ``kind`` says. Only a
  config without a tokenizer file (a workdir written before workdirs carried theirs)
  falls back to the dataset's tokenizer, which needs the dataset."""
  tcfg = config.data.tokenizer
  where = base_dir or "the model"
  path = text.resolve_path(tcfg.get("path", None), base_dir)  # data section: free-form
  if path and not os.path.exists(path):
    raise LoadError(f"the tokenizer file {path} of {where} is missing; copy the whole workdir "
                    "(with its tokenizer/ folder), or pass fszjax.load(PATH, tokenizer='FILE') / "
                    "--config.data.tokenizer.path=FILE")
  tok = text.from_config(tcfg, base_dir)
  if tok is not None:
    return tok
  try:
    return vocab.get_tokenizer(config.data)
  except data_errors.DataError as e:
    raise LoadError(
        f"{where} carries no tokenizer file (config.data.tokenizer.path is empty: written before "
        "workdirs kept a copy, or a checkpoint without its workdir) and the dataset it was "
        f"trained on is not readable ({e}); pass fszjax.load(PATH, tokenizer='FILE.model') / "
        "--config.data.tokenizer.path=FILE.model, or --config.data.data_dir=DIR where the "
        "dataset is prepared") from None


def _to_pil(img, mode: str):
  from PIL import Image  # Pillow: only to open image files

  if isinstance(img, Image.Image):
    out = img
  else:
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
      if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"images must be PIL images, uint8 arrays or floats in [0, 1]; "
                         f"got {arr.dtype}")
      arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
      arr = arr[..., 0]
    if arr.ndim not in (2, 3):
      raise ValueError(f"an image must be (H, W) or (H, W, C), got shape {arr.shape}")
    out = Image.fromarray(arr)
  return out.convert(mode) if out.mode != mode else out


class Model:
  """A loaded two-tower model with its preprocessing and tokenizer.

  Attributes: ``config``, ``module`` (the `TwoTower`), ``params``, ``image_size``,
  ``channels``, ``mean``/``std``, ``max_len``, ``logit_scale`` / ``logit_bias`` (floats,
  as used in the logits: ``scale * zimg @ ztxt.T + bias``).

  ``precision`` is the float32 matmul precision of the encoders ("highest" by default, so
  numbers match PyTorch's float32 on GPUs too, where JAX's default may use TF32/bf16
  passes; pass "default" for speed, or None to inherit the global setting).
  """

  def __init__(self, config, params, tokenizer=None, base_dir: str | None = None,
               batch_size: int = 64, precision: str | None = "highest"):
    self.config, self.base_dir, self.batch_size = config, base_dir, int(batch_size)
    self.precision = precision
    self.module = build_model(config.model)
    self.params = jax.device_put(params)
    # The data section is free-form (fszjax/data/defaults.py): its keys may be absent.
    data = config.data if "data" in config else {}
    img = config.model.image
    self.image_size = int(img.image_size or data.get("image_size", 224))
    self.channels = int(img.channels or data.get("channels", 3))
    self.mean = np.broadcast_to(np.asarray(data.get("mean", None) or (0.0,), np.float32),
                                (self.channels,)).copy()
    self.std = np.broadcast_to(np.asarray(data.get("std", None) or (1.0,), np.float32),
                               (self.channels,)).copy()
    self.max_len = int(config.model.text.max_len)
    self.resize_mode = config.inference.resize_mode
    self.interpolation = config.inference.interpolation
    self._tokenizer = tokenizer
    module = self.module
    self._img = {n: jax.jit(lambda p, x, n=n: module.apply({"params": p}, x, n,
                                                            method=TwoTower.encode_image))
                 for n in (True, False)}
    self._txt = {n: jax.jit(lambda p, t, n=n: module.apply({"params": p}, t, n,
                                                            method=TwoTower.encode_text))
                 for n in (True, False)}
    t, b = module.apply({"params": self.params}, method=TwoTower.scale_and_bias)
    self.logit_scale = float(np.exp(np.asarray(t)))
    self.logit_bias = None if b is None else float(np.asarray(b))

  def __repr__(self):
    m = self.config.model
    return (f"fszjax.inference.Model(image {self.image_size}px x{self.channels}, text "
            f"{self.max_len} tokens, embed_dim {m.embed_dim}, tokenizer "
            f"{type(self._tokenizer).__name__ if self._tokenizer else 'lazy'})")

  # -- text
  @property
  def tokenizer(self):
    """The model's tokenizer (loaded on first use)."""
    if self._tokenizer is None:
      self._tokenizer = model_tokenizer(self.config, self.base_dir)
    return self._tokenizer

  def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
    """Texts -> int32 ``(B, max_len)`` tokens for `encode_text`."""
    return np.asarray(self.tokenizer.encode(texts, self.max_len), np.int32)

  def encode_text(self, tokens, normalize: bool = True) -> np.ndarray:
    """int ``(B, L)`` tokens (or a list of strings, tokenized first) -> ``(B, E)`` float32."""
    if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and tokens
                                   and isinstance(tokens[0], str)):
      tokens = self.tokenize(tokens)
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be (B, L), got shape {tokens.shape}; use model.tokenize(texts)")
    return self._batched(self._txt[bool(normalize)], tokens.astype(np.int32))

  # -- images
  def preprocess(self, images) -> np.ndarray:
    """Raw images (a PIL image, an (H, W[, C]) uint8 array, a list of them, or a
    (B, H, W, C) uint8 array) -> ``(B, S, S, C)`` float32: resized as the model expects
    (``config.inference.resize_mode`` / ``interpolation``), scaled to [0, 1],
    normalised with ``config.data.mean/std``."""
    arr = images if isinstance(images, np.ndarray) else None
    if arr is not None and arr.ndim == 4:
      items = list(arr)
    elif isinstance(images, (list, tuple)):
      items = list(images)
    else:
      items = [images]
    mode = "L" if self.channels == 1 else "RGB"
    out = np.empty((len(items), self.image_size, self.image_size, self.channels), np.float32)
    for i, im in enumerate(items):
      pil = resize(_to_pil(im, mode), self.image_size, self.resize_mode, self.interpolation)
      x = np.asarray(pil, np.float32).reshape(self.image_size, self.image_size, self.channels)
      out[i] = (x / 255.0 - self.mean) / self.std
    return out

  def encode_image(self, images, normalize: bool = True) -> np.ndarray:
    """Preprocessed float ``(B, S, S, C)`` images -> ``(B, E)`` float32. Raw images (PIL,
    uint8 arrays, lists) are passed through `preprocess` first."""
    return self._batched(self._img[bool(normalize)], self.image_batch(images))

  def image_batch(self, images) -> np.ndarray:
    """The model's float ``(B, S, S, C)`` input from raw images (PIL, uint8 arrays, lists:
    passed through `preprocess`) or already preprocessed floats (checked)."""
    if (isinstance(images, (list, tuple)) or not hasattr(images, "shape")
        or images.dtype == np.uint8):
      images = self.preprocess(images)
    images = np.asarray(images, np.float32)
    want = (self.image_size, self.image_size, self.channels)
    if images.ndim != 4 or images.shape[1:] != want:
      raise ImageInputError(f"images must be (B, {want[0]}, {want[1]}, {want[2]}) NHWC, got "
                            f"{images.shape}; pass uint8 arrays or PIL images, or "
                            "model.preprocess(raw_images)")
    return images

  # -- zero-shot
  def zero_shot_classifier(self, classnames: Sequence[str | Sequence[str]],
                           templates: Sequence[str] | None = None) -> np.ndarray:
    """``(C, E)`` classifier: per class the renormalised mean embedding of its prompts
    (``templates`` formatted with the name; default ``config.data.prompt_templates``), or
    of its own list of descriptions."""
    if templates is None:
      templates = tuple(self.config.data.get("prompt_templates", None) or ("{}",))  # free-form
    return evaluate.zero_shot_classifier(lambda t: self.encode_text(self.tokenize(t)),
                                         classnames, templates)

  def logits(self, images, tokens) -> np.ndarray:
    """``(B_img, B_txt)`` logits ``scale * zimg @ ztxt.T (+ bias)`` as in training."""
    zi, zt = self.encode_image(images), self.encode_text(tokens)
    out = self.logit_scale * zi @ zt.T
    return out + self.logit_bias if self.logit_bias is not None else out

  def classify(self, images, classifier: np.ndarray) -> np.ndarray:
    """``(B, C)`` class probabilities: softmax of ``scale * zimg @ classifier.T``."""
    s = self.logit_scale * self.encode_image(images) @ np.asarray(classifier, np.float32).T
    s = s - s.max(axis=1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=1, keepdims=True)

  # -- few-shot
  def few_shot(self, support_images, support_labels, *, class_names=None,
               method: str = "zs_head_adapt", **options):
    """A classifier adapted to a few labelled images: see `fszjax.fewshot.api.few_shot`
    (methods zeroshot, protonet, zs_head_adapt, finetune, wise_ft)."""
    return api.few_shot(self, support_images, support_labels, class_names=class_names,
                        method=method, **options)

  def _batched(self, fn, x: np.ndarray) -> np.ndarray:
    n = len(x)
    if n == 0:
      raise ValueError("nothing to encode")


    bs = self.batch_size
    outs = []
    for i in range(0, n, bs):
      chunk = x[i:i + bs]
      pad = bs - len(chunk) if n > bs else 0
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
      with (jax.default_matmul_precision(self.precision) if self.precision
            else contextlib.nullcontext()):
        out = np.asarray(fn(self.params, chunk), np.float32)
      outs.append(out[:len(out) - pad] if pad else out)
    return np.concatenate(outs)


def load(path: str, *, tokenizer: Any = None, batch_size: int = 64,
         precision: str | None = "highest") -> Model:
  """Loads a fszjax workdir, a directory written by `fszjax convert`, a checkpoints
  directory or one checkpoint step directory (its latest step unless a step directory is
  given). ``tokenizer`` overrides the config's: an object with ``encode(texts, max_len)``,
  a CLIP BPE ``.txt.gz`` path, or a SentencePiece ``.model`` path (used the way the
  config's ``data.tokenizer.kind`` says: fszjax's or big_vision's). ``precision``: see
  `Model`."""
  try:
    config, base_dir = load_config(path)
    params = ckpt_lib.load_params_numpy(path)
  except UserError:
    raise
  except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable bytes, bad JSON, ...
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
    raise LoadError(f"{os.path.abspath(os.path.expanduser(path))} is not a loadable fszjax model "
                    f"({type(e).__name__}: {first}); pass a fszjax workdir, a directory written "
                    "by `fszjax convert` or a checkpoint step directory") from None
  if isinstance(tokenizer, str):
    tcfg = config.data.get("tokenizer", None) if "data" in config else None  # free-form
    tcfg = dict(tcfg.to_dict() if hasattr(tcfg, "to_dict") else (tcfg or {}), path=tokenizer)
    if tokenizer.endswith(".gz") or tokenizer.endswith(".txt"):
      tcfg["kind"] = "clip_bpe"
    tokenizer = text.from_config(tcfg) or text.load_tokenizer(tokenizer)
  return Model(config, params, tokenizer=tokenizer, base_dir=base_dir, batch_size=batch_size,
               precision=precision)
