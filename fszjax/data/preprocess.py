"""Decoding and preprocessing of one example, shared by training, evaluation and inference.

`ExampleProcessor` turns a raw example into ``{'image', 'tokens', 'label'}``: PIL decodes
the image (no TensorFlow), `resize` brings it to the model's size (the "center" mode is
the data pipeline's; "shortest" / "squash" serve converted open_clip / big_vision models
in `fszjax.inference`), augmentation is seeded per example, and normalisation uses the
config's mean / std.
"""

from __future__ import annotations

import io
import logging
import math
import threading
from typing import Any

import numpy as np
from PIL import Image

from fszjax.data.errors import DataError

log = logging.getLogger(__name__)

SKIP = "__skip__"
RESIZE_MODES = ("shortest", "squash", "center")


def to_plain(cfg) -> dict[str, Any]:
  """A ConfigDict (or mapping) as a plain dict."""
  if hasattr(cfg, "to_dict"):
    return cfg.to_dict()
  return dict(cfg)


def key_or_none(v):
  """A configured feature key, or None when it is empty / "none"."""
  return v if v not in (None, "", "none", "None") else None


def lookup(ex: dict, key: str):
  """The value at "a/b" of a (nested) example."""
  v = ex
  for p in key.split("/"):
    v = v[p]
  return v


def as_str(v) -> str:
  """bytes / 0-d array / anything -> str."""
  if isinstance(v, bytes):
    return v.decode("utf-8", errors="replace")
  if isinstance(v, np.ndarray) and v.ndim == 0:
    return as_str(v.item())
  return str(v)


def text_options(v) -> list[str]:
  """A text feature value -> list of strings (a caption sequence gives several)."""
  if isinstance(v, (list, tuple)) or (isinstance(v, np.ndarray) and v.ndim > 0):
    return [as_str(x) for x in list(v)]
  return [as_str(v)]



def decode_image(value, mode: str):
  """Encoded bytes (or a decoded uint8 array) -> PIL image in `mode` ("L" or "RGB")."""
  if isinstance(value, (bytes, bytearray, memoryview)) or (
      isinstance(value, np.ndarray) and value.dtype == object):
    raw = value.item() if isinstance(value, np.ndarray) else value
    img = Image.open(io.BytesIO(bytes(raw)))
    img.load()
  else:
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[-1] == 1:
      arr = arr[..., 0]
    if arr.dtype != np.uint8:
      arr = np.clip(arr, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
  if getattr(img, "n_frames", 1) > 1:
    img.seek(0)
  if img.mode != mode:
    img = img.convert(mode)
  return img



def resize(img, size: int, mode: str = "shortest", interpolation: str = "bicubic"):
  """One PIL image -> ``size x size``.

  shortest: shorter side to `size`, then centre crop (torchvision ``Resize(size)`` +
  ``CenterCrop``, open_clip's preprocessing); squash: straight to size x size (big_vision /
  SigLIP); center: fszjax's data pipeline (the crop box resampled directly).
  """
  resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR,
              "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}.get(interpolation)
  if resample is None:
    raise ValueError(f"unknown interpolation {interpolation!r}; use bicubic, bilinear, nearest "
                     "or lanczos")
  w, h = img.size
  if mode == "squash":
    return img.resize((size, size), resample)
  if mode == "center":
    if (w, h) == (size, size):
      return img
    s = size / min(w, h)
    nw, nh = max(size, int(round(w * s))), max(size, int(round(h * s)))
    x0, y0 = (nw - size) / 2 / s, (nh - size) / 2 / s
    return img.resize((size, size), resample, box=(x0, y0, x0 + size / s, y0 + size / s))
  if mode != "shortest":
    raise ValueError(f"unknown resize mode {mode!r}; use one of {RESIZE_MODES}")
  if w <= h:
    nw, nh = size, int(size * h / w)
  else:
    nw, nh = int(size * w / h), size
  if (nw, nh) != (w, h):
    img = img.resize((nw, nh), resample)
  top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
  return img.crop((left, top, left + size, top + size))


def _random_resized_crop(img, size: int, rng: np.random.Generator, scale, ratio):
  w, h = img.size
  area = w * h
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = math.sqrt(target * r), math.sqrt(target / r)
    if 0 < cw <= w and 0 < ch <= h:
      x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
      return img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
  return resize(img, size, "center", "bilinear")


def _affine_jitter(img, rng: np.random.Generator, aug: dict):
  """Small random rotation / scale / translation / shear about the centre (fill 0)."""
  w, h = img.size
  rot = math.radians(rng.uniform(-aug["rotate_deg"], aug["rotate_deg"]))
  shear = math.radians(rng.uniform(-aug["shear_deg"], aug["shear_deg"]))
  s = rng.uniform(aug["scale"][0], aug["scale"][1])
  tx, ty = (rng.uniform(-aug["translate"], aug["translate"], size=2) * np.array([w, h])).tolist()
  # Forward map: x' = A (x - c) + c + t, A = s * R(rot) @ Shear(shear).
  cos, sin = math.cos(rot), math.sin(rot)
  a = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, math.tan(shear)], [0.0, 1.0]]) * s
  inv = np.linalg.inv(a)
  cx, cy = w / 2, h / 2
  # PIL wants the inverse map: x = inv (x' - c - t) + c.
  off = np.array([cx, cy]) - inv @ np.array([cx + tx, cy + ty])
  coeffs = (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])
  return img.transform((w, h), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=0)


def stroke_probability(value, key: str) -> float:
  """``value`` as the probability `stroke_jitter` takes; a DataError naming ``key`` (the
  config key it came from) unless it is in [0, 1]. Checked once, when a job is set up."""
  p = float(value or 0.0)
  if not 0.0 <= p <= 1.0:
    raise DataError(f"{key}={value} must be a probability in [0, 1] (0 = off)")
  return p


def stroke_jitter(x: np.ndarray, rng: np.random.Generator, p: float) -> np.ndarray:
  """Random stroke-width jitter of bright-on-dark images ``x (..., H, W, C)`` (any
  monotonic scaling of the pixel values): each image is, with probability ``p / 2``,
  dilated (thicker strokes) and with probability ``p / 2`` eroded (thinner strokes) by a
  2x2 max / min filter (edges replicated); the rest is returned unchanged. ``p``: a
  probability (`stroke_probability`).

  Glyphs: fonts differ in stroke weight as much as in shape, and the training fonts are one
  family; the jitter makes the image tower see weights between and beyond them
  (BUILD_NOTES.md, "Transfer: third round")."""
  x = np.asarray(x)
  if p == 0.0:
    return x
  h, w = x.shape[-3], x.shape[-2]
  pad = np.pad(x, [(0, 0)] * (x.ndim - 3) + [(0, 1), (0, 1), (0, 0)], mode="edge")
  views = [pad[..., a:a + h, b:b + w, :] for a in (0, 1) for b in (0, 1)]
  r = rng.random(x.shape[:-3])[..., None, None, None]
  out = np.where(r < p / 2, np.maximum.reduce(views), x)
  return np.where((r >= p / 2) & (r < p), np.minimum.reduce(views), out).astype(x.dtype)


class ExampleProcessor:
  """Turns one raw example into `{'image', 'tokens', 'label'}` (picklable for workers).

  image float32 (S, S, C) normalised; tokens int32 (L,); label int32 () (-1 without
  labels). Returns a skip marker when the image cannot be decoded.
  """

  def __init__(self, cfg: dict[str, Any], class_names: list[str] | None,
               tokenizer: Any, train: bool, counter=None):
    self.image_key = cfg.get("image_key") or "image"
    self.label_key = key_or_none(cfg.get("label_key"))
    self.text_key = key_or_none(cfg.get("text_key"))
    self.size = int(cfg["image_size"])
    self.channels = int(cfg["channels"])
    if self.channels not in (1, 3):
      raise DataError(f"data.channels={self.channels} is unsupported; use 1 (grayscale) or 3 (RGB)")
    self.mode = "L" if self.channels == 1 else "RGB"
    mean = np.asarray(cfg.get("mean") or (0.0,), np.float32)
    std = np.asarray(cfg.get("std") or (1.0,), np.float32)
    self.mean = np.broadcast_to(mean, (self.channels,)).copy() if mean.size in (1, self.channels) else None
    self.std = np.broadcast_to(std, (self.channels,)).copy() if std.size in (1, self.channels) else None
    if self.mean is None or self.std is None:
      raise DataError(f"data.mean/std need 1 or {self.channels} values")
    self.augment = dict(to_plain(cfg.get("augment") or {})) if train else {}
    self.stroke = stroke_probability(self.augment.get("stroke"), "data.augment.stroke")
    self.templates = tuple(cfg.get("train_templates") or ("{}",))
    self.class_names = class_names
    self.tokenizer = tokenizer
    self.max_len = int(cfg.get("max_text_len") or 16)
    self.train = train
    self.counter = counter

  def image(self, value, rng: np.random.Generator | None) -> np.ndarray:
    """Decoded/augmented/normalised float32 (S, S, C); raises on undecodable input."""
    img = decode_image(value, self.mode)
    aug = self.augment
    if rng is not None and aug.get("random_resized_crop"):
      img = _random_resized_crop(img, self.size, rng, aug["crop_scale"], aug["crop_ratio"])
    else:
      img = resize(img, self.size, "center", "bilinear")
    if rng is not None and aug.get("affine"):
      img = _affine_jitter(img, rng, aug)
    if rng is not None and aug.get("hflip") and rng.random() < 0.5:
      img = img.transpose(0)  # FLIP_LEFT_RIGHT
    x = np.asarray(img, np.float32).reshape(self.size, self.size, self.channels) / 255.0
    if rng is not None and self.stroke:
      x = stroke_jitter(x, rng, self.stroke)
    return (x - self.mean) / self.std

  def text(self, ex: dict, label: int, rng: np.random.Generator | None) -> str:
    if self.text_key is not None:
      options = text_options(lookup(ex, self.text_key))
      if not options:
        return ""
      return options[int(rng.integers(len(options)))] if rng is not None else options[0]
    if self.class_names is None or label < 0:
      raise DataError("no text: set data.text_key, or data.label_key to a ClassLabel feature")
    t = self.templates[0]
    if rng is not None and self.train:
      t = self.templates[int(rng.integers(len(self.templates)))]
    return t.format(self.class_names[label])

  def __call__(self, ex: dict, rng: np.random.Generator | None = None):
    try:
      image = self.image(lookup(ex, self.image_key), rng)
    except Exception as e:  # noqa: BLE001  (undecodable image: skipped and counted)
      if self.counter is not None:
        self.counter.add(e)
      return {SKIP: np.int32(1)}
    label = int(np.asarray(lookup(ex, self.label_key))) if self.label_key is not None else -1
    out = {"image": image, "label": np.int32(label)}
    if self.tokenizer is not None:
      out["tokens"] = self.tokenizer.encode([self.text(ex, label, rng)], self.max_len)[0]
    return out


class SkipCounter:
  """Counts undecodable images in this process (eval path)."""

  def __init__(self):
    self.count = 0
    self._lock = threading.Lock()

  def add(self, e):
    with self._lock:
      self.count += 1
      if self.count <= 3:
        log.warning("skipping undecodable image (%s: %s)", type(e).__name__, str(e)[:100])

  def __getstate__(self):
    return {"count": self.count}

  def __setstate__(self, s):
    self.count = s["count"]
    self._lock = threading.Lock()
