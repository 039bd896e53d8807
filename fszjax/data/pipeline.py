"""Grain input pipelines over TFDS ArrayRecord data (TF-free reading: PIL decodes).

One pipeline per JAX process:

  tfds.data_source (random access) -> global shuffle (seeded, reshuffled every epoch)
  -> repeat -> per-example decode + augment + tokenize (seeded by the global index)
  -> [mix several datasets with weights] -> shard by process (index p, p+P, p+2P, ...)
  -> threads (or worker processes) -> batches of b = global_batch / P, drop_remainder

Each batch is a dict of numpy arrays: `image` float32 (b, H, W, C), `tokens` int32
(b, L), `label` int32 (b,). The iterator is a grain `DatasetIterator`: `get_state()` /
`set_state()` give exact resume, and it works with `grain.checkpoint.CheckpointSave /
CheckpointRestore` as an Orbax checkpoint item. Undecodable images are skipped and
counted (`iterator.num_skipped`).

Entry points: `make_train_iterator`, `load_split_arrays`, `get_tokenizer`,
`class_names`, `prompt_templates`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from typing import Any

import grain
import numpy as np

from fszjax.data import glyphs as glyphs_lib
from fszjax import text
from fszjax.text import sentencepiece as tokenizer_lib

log = logging.getLogger(__name__)

_SKIP = "__skip__"


class DataError(ValueError):
  """A data problem with a one-line message naming the fix (shown without traceback by the CLI)."""

  user_error = True


class DataNotPreparedError(DataError):
  """The dataset is not prepared in data_dir; the message names the prepare command."""


class FeatureKeyError(DataError, KeyError):
  """A configured feature key is not in the dataset; the message lists the available keys."""

  def __str__(self):  # KeyError would quote the message
    return str(self.args[0])


# ----------------------------------------------------------------------------- config


def _get(cfg, key, default=None):
  if cfg is None:
    return default
  if isinstance(cfg, dict):
    return cfg.get(key, default)
  try:
    return cfg.get(key, default)
  except AttributeError:
    return getattr(cfg, key, default)


def _to_plain(cfg) -> dict[str, Any]:
  if hasattr(cfg, "to_dict"):
    return cfg.to_dict()
  return dict(cfg)


def _components(data_cfg) -> list[tuple[dict[str, Any], float]]:
  """The (config, weight) of each dataset: the mixture entries over the base config."""
  base = _to_plain(data_cfg)
  mixture = base.pop("mixture", None) or ()
  if not mixture:
    return [(base, 1.0)]
  out = []
  for i, entry in enumerate(mixture):
    entry = dict(_to_plain(entry))
    weight = float(entry.pop("weight", 1.0))
    if weight <= 0:
      raise DataError(f"data.mixture[{i}].weight={weight} must be > 0")
    unknown = sorted(k for k in entry if k not in base)
    if unknown:
      raise DataError(f"data.mixture[{i}] has unknown keys {unknown}; use keys of data: {sorted(base)}")
    merged = dict(base)
    merged.update(entry)
    out.append((merged, weight))
  return out


def _key_or_none(v):
  return v if v not in (None, "", "none", "None") else None


# ----------------------------------------------------------------------------- opening


def _glyph_options(cfg: dict[str, Any], name: str) -> glyphs_lib.GlyphsOptions:
  g = cfg.get("glyphs") or {}
  size = g.get("image_size") or cfg.get("image_size") or glyphs_lib.DEFAULT_IMAGE_SIZE
  held = tuple(glyphs_lib.DEFAULT_HELD_OUT_FONTS) + tuple(g.get("held_out_fonts") or ())
  return glyphs_lib.GlyphsOptions(image_size=int(size), font_dirs=tuple(g.get("font_dirs") or ()),
                                  max_chars=g.get("max_chars"), held_out_fonts=held)


def _glyph_prepare_command(cfg, data_dir) -> str:
  g = cfg.get("glyphs") or {}
  cmd = f"fszjax prepare glyphs --data_dir {data_dir}"
  size = g.get("image_size") or cfg.get("image_size")
  if size and int(size) != glyphs_lib.DEFAULT_IMAGE_SIZE:
    cmd += f" --image_size {int(size)}"
  for d in g.get("font_dirs") or ():
    cmd += f" --font_dir {d}"
  for h in g.get("held_out_fonts") or ():
    cmd += f" --heldout_fonts '{h}'"
  if g.get("max_chars"):
    cmd += f" --max_chars {int(g['max_chars'])}"
  return cmd


def _version_dirs(path: str) -> list[str]:
  if not os.path.isdir(path):
    return []
  vs = [d for d in os.listdir(path) if os.path.exists(os.path.join(path, d, "dataset_info.json"))]
  return sorted(vs, key=lambda v: tuple(int(x) if x.isdigit() else 0 for x in v.split(".")))


class _Opened:
  """A dataset split opened for random access, with its feature spec and class names."""

  def __init__(self, name, split, source, features, dataset_dir, class_names, glyph_meta=None):
    self.name = name
    self.split = split
    self.source = source
    self.features = features
    self.dataset_dir = dataset_dir  # where the tokenizer cache goes by default
    self.class_names = class_names
    self.glyph_meta = glyph_meta


def _flat_features(features, prefix="") -> dict[str, Any]:
  """'a/b' -> feature for every (nested) feature of a FeaturesDict."""
  import tensorflow_datasets as tfds  # noqa: PLC0415

  out = {}
  items = features.items() if hasattr(features, "items") else []
  for k, f in items:
    path = f"{prefix}{k}"
    out[path] = f
    inner = f.feature if isinstance(f, tfds.features.Sequence) else f
    if isinstance(inner, tfds.features.FeaturesDict):
      out.update(_flat_features(inner, path + "/"))
  return out


def _check_keys(opened_name: str, features, keys: dict[str, str | None]) -> None:
  flat = _flat_features(features)
  for field, key in keys.items():
    if key is not None and key not in flat:
      raise FeatureKeyError(
          f"feature key {key!r} (data.{field}) is not in {opened_name}; available keys: "
          f"{', '.join(sorted(flat))}")


def _decoders(features, image_key: str, image_decoder: str):
  import tensorflow_datasets as tfds  # noqa: PLC0415

  if image_decoder == "tfds":
    import importlib.util  # noqa: PLC0415

    if importlib.util.find_spec("tensorflow") is None:  # TFDS decodes images with TensorFlow
      raise DataError("data.image_decoder='tfds' needs TensorFlow: pip install 'fszjax[tfds-images]' "
                      "(or use data.image_decoder='pil', which needs no TensorFlow)")
    return None
  if image_decoder != "pil":
    raise DataError(f"data.image_decoder={image_decoder!r} is unknown; use 'pil' or 'tfds'")
  parts = image_key.split("/")
  dec: Any = tfds.decode.SkipDecoding()
  for p in reversed(parts):
    dec = {p: dec}
  return dec


def _class_names_from_features(features, label_key: str | None) -> list[str] | None:
  import tensorflow_datasets as tfds  # noqa: PLC0415

  if label_key is None:
    return None
  f = _flat_features(features).get(label_key)
  if isinstance(f, tfds.features.ClassLabel):
    return [n.replace("_", " ") for n in f.names]
  return None


def _open(cfg: dict[str, Any], split: str) -> _Opened:
  """Opens `split` of the dataset named in `cfg` (glyphs, a prepared directory or the catalog)."""
  import tensorflow_datasets as tfds  # noqa: PLC0415

  name = cfg["name"]
  data_dir = glyphs_lib.default_data_dir(cfg.get("data_dir"))
  image_key = cfg.get("image_key") or "image"
  image_decoder = cfg.get("image_decoder") or "pil"

  base = name.split(":")[0]
  glyph_meta = None
  if base == glyphs_lib.NAME or base.startswith(glyphs_lib.NAME + "/"):
    if base == glyphs_lib.NAME:
      options = _glyph_options(cfg, name)
      ddir = glyphs_lib.dataset_dir(options, data_dir)
    else:
      vs = _version_dirs(os.path.join(data_dir, base))
      ddir = os.path.join(data_dir, base, vs[-1]) if vs else os.path.join(data_dir, base, glyphs_lib.VERSION)
    if not os.path.exists(os.path.join(ddir, "dataset_info.json")):
      raise DataNotPreparedError(
          f"dataset {name} is not prepared in {data_dir}; run `{_glyph_prepare_command(cfg, data_dir)}`")
    builder = tfds.builder_from_directory(ddir)
    glyph_meta = glyphs_lib.read_metadata(ddir)
  else:
    local = os.path.join(data_dir, base)
    vs = _version_dirs(local)
    if vs:
      ddir = os.path.join(local, vs[-1])
      builder = tfds.builder_from_directory(ddir)
    else:
      try:
        builder = tfds.builder(name, data_dir=data_dir)
      except Exception as e:  # noqa: BLE001  (DatasetNotFoundError, unknown config, ...)
        if base.split("/")[0] in ("user_image_folder", "user_image_captions"):
          kind = "folder ROOT" if base.startswith("user_image_folder") else "captions MANIFEST"
          raise DataNotPreparedError(
              f"dataset {name} is not prepared in {data_dir}; run `fszjax prepare {kind} "
              f"--name {base.split('/')[-1]} --data_dir {data_dir}`") from None
        raise DataNotPreparedError(
            f"dataset {name} is neither prepared in {data_dir} nor in the TFDS catalog "
            f"({type(e).__name__}); check data.name or run `fszjax prepare tfds {name} "
            f"--data_dir {data_dir}`") from None
      ddir = str(builder.data_dir)
  features = builder.info.features
  label_key = _key_or_none(cfg.get("label_key"))
  text_key = _key_or_none(cfg.get("text_key"))
  domain_key = _key_or_none(cfg.get("domain_key"))
  _check_keys(name, features, {"image_key": image_key, "label_key": label_key,
                               "text_key": text_key, "domain_key": domain_key})
  decoders = _decoders(features, image_key, image_decoder)
  try:
    source = builder.as_data_source(split=split, decoders=decoders)
  except Exception as e:  # noqa: BLE001
    msg = str(e).split("\n")[0]
    splits = list(builder.info.splits.keys()) if builder.info.splits else []
    if splits and split.split("[")[0] not in splits:
      raise DataError(f"split {split!r} is not in {name}; available splits: {', '.join(splits)}") from None
    try:
      prepared = bool(builder.is_prepared())
    except Exception:  # noqa: BLE001
      prepared = False
    if not prepared:
      raise DataNotPreparedError(
          f"dataset {name} is not prepared in {data_dir}; run `fszjax prepare tfds {name} "
          f"--data_dir {data_dir}`") from None
    if isinstance(e, NotImplementedError) or "file format" in msg.lower():
      raise DataNotPreparedError(
          f"dataset {name} in {data_dir} is not in ArrayRecord format; run `fszjax prepare tfds "
          f"{name} --data_dir {data_dir}` (writes ArrayRecord) into another data_dir") from None
    raise DataNotPreparedError(
        f"dataset {name} is not prepared in {data_dir} ({type(e).__name__}: {msg[:120]}); run "
        f"`fszjax prepare tfds {name} --data_dir {data_dir}`") from None
  if glyph_meta is not None:
    split_name = split.split("[")[0]
    if split_name not in glyph_meta["splits"]:
      available = ", ".join(glyph_meta["splits"])
      raise DataError(f"split {split!r} is not in {name}; available splits: {available}")
    class_names = list(glyph_meta["splits"][split_name]["class_names"])
  else:
    class_names = _class_names_from_features(features, label_key)
  names_file = cfg.get("class_names_file")
  if names_file:
    if not os.path.exists(names_file):
      raise DataError(f"data.class_names_file {names_file!r} not found; give a text file with one "
                      "name per line")
    with open(names_file, encoding="utf-8") as f:
      class_names = [line.strip() for line in f if line.strip()]
  return _Opened(name, split, source, features, ddir, class_names, glyph_meta)


# ----------------------------------------------------------------------------- examples


def _lookup(ex: dict, key: str):
  v = ex
  for p in key.split("/"):
    v = v[p]
  return v


def _as_str(v) -> str:
  if isinstance(v, bytes):
    return v.decode("utf-8", errors="replace")
  if isinstance(v, np.ndarray) and v.ndim == 0:
    return _as_str(v.item())
  return str(v)


def _text_options(v) -> list[str]:
  """A text feature value -> list of strings (a caption sequence gives several)."""
  if isinstance(v, (list, tuple)) or (isinstance(v, np.ndarray) and v.ndim > 0):
    return [_as_str(x) for x in list(v)]
  return [_as_str(v)]


def _to_pil(value, mode: str):
  """Encoded bytes (or a decoded uint8 array) -> PIL image in `mode` ("L" or "RGB")."""
  from PIL import Image  # noqa: PLC0415

  if isinstance(value, (bytes, bytearray, memoryview)) or (
      isinstance(value, np.ndarray) and value.dtype == object):
    import io  # noqa: PLC0415

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


def _resize_center(img, size: int):
  """Resize the shorter side to `size`, then centre-crop to size x size."""
  from PIL import Image  # noqa: PLC0415

  w, h = img.size
  if (w, h) == (size, size):
    return img
  s = size / min(w, h)
  nw, nh = max(size, int(round(w * s))), max(size, int(round(h * s)))
  x0, y0 = (nw - size) / 2 / s, (nh - size) / 2 / s
  return img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + size / s, y0 + size / s))


def _random_resized_crop(img, size: int, rng: np.random.Generator, scale, ratio):
  from PIL import Image  # noqa: PLC0415

  w, h = img.size
  area = w * h
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = math.sqrt(target * r), math.sqrt(target / r)
    if 0 < cw <= w and 0 < ch <= h:
      x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
      return img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
  return _resize_center(img, size)


def _affine_jitter(img, rng: np.random.Generator, aug: dict):
  """Small random rotation / scale / translation / shear about the centre (fill 0)."""
  from PIL import Image  # noqa: PLC0415

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


class ExampleProcessor:
  """Turns one raw example into `{'image', 'tokens', 'label'}` (picklable for workers).

  image float32 (S, S, C) normalised; tokens int32 (L,); label int32 () (-1 without
  labels). Returns a skip marker when the image cannot be decoded.
  """

  def __init__(self, cfg: dict[str, Any], class_names: list[str] | None,
               tokenizer: tokenizer_lib.Tokenizer | None, train: bool, counter=None):
    self.image_key = cfg.get("image_key") or "image"
    self.label_key = _key_or_none(cfg.get("label_key"))
    self.text_key = _key_or_none(cfg.get("text_key"))
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
    self.augment = dict(_to_plain(cfg.get("augment") or {})) if train else {}
    self.templates = tuple(cfg.get("train_templates") or ("{}",))
    self.class_names = class_names
    self.tokenizer = tokenizer
    self.max_len = int(cfg.get("max_text_len") or 16)
    self.train = train
    self.counter = counter

  def image(self, value, rng: np.random.Generator | None) -> np.ndarray:
    """Decoded/augmented/normalised float32 (S, S, C); raises on undecodable input."""
    img = _to_pil(value, self.mode)
    aug = self.augment
    if rng is not None and aug.get("random_resized_crop"):
      img = _random_resized_crop(img, self.size, rng, aug["crop_scale"], aug["crop_ratio"])
    else:
      img = _resize_center(img, self.size)
    if rng is not None and aug.get("affine"):
      img = _affine_jitter(img, rng, aug)
    if rng is not None and aug.get("hflip") and rng.random() < 0.5:
      img = img.transpose(0)  # FLIP_LEFT_RIGHT
    x = np.asarray(img, np.float32).reshape(self.size, self.size, self.channels) / 255.0
    return (x - self.mean) / self.std

  def text(self, ex: dict, label: int, rng: np.random.Generator | None) -> str:
    if self.text_key is not None:
      options = _text_options(_lookup(ex, self.text_key))
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
      image = self.image(_lookup(ex, self.image_key), rng)
    except Exception as e:  # noqa: BLE001  (undecodable image: skipped and counted)
      if self.counter is not None:
        self.counter.add(e)
      return {_SKIP: np.int32(1)}
    label = int(np.asarray(_lookup(ex, self.label_key))) if self.label_key is not None else -1
    out = {"image": image, "label": np.int32(label)}
    if self.tokenizer is not None:
      out["tokens"] = self.tokenizer.encode([self.text(ex, label, rng)], self.max_len)[0]
    return out


class _SkipCounter:
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


# ----------------------------------------------------------------------------- tokenizer


def _tokenizer_cache_path(data_cfg, comps, opened0: _Opened) -> str:
  tcfg = _to_plain(data_cfg["tokenizer"] if isinstance(data_cfg, dict) else data_cfg.tokenizer)
  key_src = json.dumps([
      [(c["name"], c.get("train_split"), _key_or_none(c.get("text_key")), _key_or_none(c.get("label_key")),
        list(c.get("train_templates") or ()), _glyph_cfg_name(c)) for c, _ in comps],
      list(_get(data_cfg, "prompt_templates", ()) or ()), tcfg["max_texts"],
  ], sort_keys=True, default=str)
  key = hashlib.sha1(key_src.encode()).hexdigest()[:10]
  cache_dir = tcfg.get("cache_dir") or os.path.join(opened0.dataset_dir, "fszjax_tokenizer")
  return os.path.join(cache_dir, f"spm_{tcfg['model_type']}{int(tcfg['vocab_size'])}_{key}.model")


def _glyph_cfg_name(c) -> str | None:
  if c["name"].split(":")[0] == glyphs_lib.NAME:
    return glyphs_lib.config_name(_glyph_options(c, c["name"]))
  return None


def _training_texts(cfg: dict[str, Any], opened: _Opened, max_texts: int) -> list[str]:
  """Texts a tokenizer is trained on: class names (Glyphs / ClassLabel) or the text feature."""
  text_key = _key_or_none(cfg.get("text_key"))
  if opened.glyph_meta is not None and text_key == "text":
    return list(opened.class_names)
  if text_key is None:
    if not opened.class_names:
      raise DataError(f"{opened.name}: no text to train a tokenizer on; set data.text_key or data.label_key")
    return [t.format(n) for n in opened.class_names for t in (cfg.get("train_templates") or ("{}",))]
  texts: list[str] = []
  n = len(opened.source)
  idx = np.linspace(0, n - 1, num=min(n, max_texts), dtype=np.int64) if n else []
  for i in idx:
    texts += _text_options(_lookup(opened.source[int(i)], text_key))
  return texts[:max_texts]


def get_tokenizer(data_cfg) -> tokenizer_lib.Tokenizer:
  """The tokenizer of `data_cfg`: `tokenizer.path` if set, else trained on the training text.

  A trained model is cached (`<dataset dir>/fszjax_tokenizer/spm_<type><vocab>_<hash>.model`
  or `tokenizer.cache_dir`) and reused; training is deterministic, so every process
  gets the same model.
  """
  tcfg = _to_plain(_get(data_cfg, "tokenizer"))
  tok = text.from_config(tcfg)
  if tok is not None:
    return tok
  comps = _components(data_cfg)
  opened = [_open(c, c["train_split"]) for c, _ in comps]
  path = _tokenizer_cache_path(data_cfg, comps, opened[0])
  if os.path.exists(path):
    return tokenizer_lib.load_tokenizer(path)
  texts: list[str] = []
  for (c, _), o in zip(comps, opened):
    texts += _training_texts(c, o, int(tcfg["max_texts"]))
  # Template words ("the character", "a photo of") get pieces too.
  templates = tuple(_get(data_cfg, "prompt_templates", ()) or ())
  templates += tuple(_get(data_cfg, "train_templates", ()) or ())
  for t in templates:
    if t.format("").strip():
      texts.append(t.format("").strip())
  tok = tokenizer_lib.train_sentencepiece(texts, None, int(tcfg["vocab_size"]), tcfg["model_type"])
  try:
    tok.save(path)
  except OSError as e:
    log.warning("could not cache the tokenizer at %s (%s); set data.tokenizer.cache_dir", path, e)
  return tok


# ----------------------------------------------------------------------------- iterators


def _batch_items(items: list[dict]) -> dict[str, np.ndarray]:
  return {k: np.stack([it[k] for it in items]) for k in items[0]}


class _CountingBatchIterator(grain.DatasetIterator):
  """Batches elements, dropping skip markers and reporting how many in `_skipped`."""

  def __init__(self, parent_it, batch_size: int, drop_remainder: bool):
    super().__init__(parent_it)
    self._batch_size = batch_size
    self._drop_remainder = drop_remainder

  def __next__(self):
    items, skipped = [], 0
    while len(items) < self._batch_size:
      try:
        x = next(self._parent)
      except StopIteration:
        if items and not self._drop_remainder:
          break
        raise
      if _SKIP in x:
        skipped += 1
        continue
      items.append(x)
    batch = _batch_items(items)
    batch["_skipped"] = np.int32(skipped)
    return batch

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class CountingBatchDataset(grain.IterDataset):
  """`IterDataset` of batches (dicts of stacked arrays) that skips undecodable examples.

  Each batch carries `_skipped`: how many examples were dropped while filling it.
  """

  def __init__(self, parent, batch_size: int, drop_remainder: bool = True):
    super().__init__(parent)
    self._batch_size = int(batch_size)
    self._drop_remainder = bool(drop_remainder)

  def __iter__(self):
    return _CountingBatchIterator(self._parent.__iter__(), self._batch_size, self._drop_remainder)

  def __str__(self):
    return f"CountingBatchDataset(batch_size={self._batch_size}, drop_remainder={self._drop_remainder})"


class TrainIterator(grain.DatasetIterator):
  """Infinite iterator of numpy batches with exact, checkpointable state.

  `num_skipped` counts undecodable images skipped so far (part of the state).
  """

  def __init__(self, parent_it, batch_size: int):
    super().__init__(parent_it)
    self.num_skipped = 0
    self.batch_size = batch_size

  def __next__(self):
    batch = next(self._parent)
    self.num_skipped += int(batch.pop("_skipped"))
    return batch

  def get_state(self):
    return {"pipeline": self._parent.get_state(), "num_skipped": int(self.num_skipped)}

  def set_state(self, state):
    self._parent.set_state(state["pipeline"])
    self.num_skipped = int(state.get("num_skipped", 0))


def _seed32(*parts) -> int:
  h = hashlib.sha256(json.dumps(parts).encode()).digest()
  return int.from_bytes(h[:4], "little")


def _process_info(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # noqa: PLC0415

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= int(process_index) < int(process_count):
    raise DataError(f"process_index={process_index} must be in [0, process_count={process_count})")
  return int(process_index), int(process_count)


def make_train_dataset(data_cfg, *, global_batch: int, seed: int, process_index: int | None = None,
                       process_count: int | None = None, tokenizer=None):
  """The grain `IterDataset` behind `make_train_iterator` (batches carry a `_skipped` count)."""
  pi, pc = _process_info(process_index, process_count)
  if global_batch % pc:
    raise DataError(f"global batch {global_batch} is not divisible by {pc} processes; use a multiple of {pc}")
  per_process = global_batch // pc
  comps = _components(data_cfg)
  tok = tokenizer if tokenizer is not None else get_tokenizer(data_cfg)
  parts, weights = [], []
  for i, (c, w) in enumerate(comps):
    opened = _open(c, c["train_split"])
    if len(opened.source) == 0:
      raise DataError(f"{c['name']} split {c['train_split']!r} is empty; choose another data.train_split")
    proc = ExampleProcessor(c, opened.class_names, tok, train=True, counter=_SkipCounter())
    ds = grain.MapDataset.source(opened.source)
    if c.get("shuffle", True):
      ds = ds.shuffle(seed=_seed32("shuffle", seed, i))
    ds = ds.repeat(None)
    ds = ds.random_map(proc, seed=_seed32("augment", seed, i))
    parts.append(ds)
    weights.append(w)
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  ds = ds[pi::pc]
  cfg0 = comps[0][0]
  read = grain.ReadOptions(num_threads=int(cfg0.get("num_threads") or 0),
                           prefetch_buffer_size=int(cfg0.get("prefetch_buffer_size") or 16))
  it_ds = ds.to_iter_dataset(read)
  it_ds = CountingBatchDataset(it_ds, per_process, drop_remainder=True)
  workers = int(cfg0.get("num_workers") or 0)
  if workers > 0:
    from absl import flags  # noqa: PLC0415  (grain's worker processes read absl flags)

    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=int(cfg0.get("worker_buffer_size") or 2)))
  return it_ds, per_process


def make_train_iterator(data_cfg, *, global_batch: int, seed: int, process_index: int | None = None,
                        process_count: int | None = None):
  """Infinite iterator of this process's training batches.

  Yields dicts of numpy arrays: image float32 (b, H, W, C), tokens int32 (b, L),
  label int32 (b,), with b = global_batch / process_count. Epochs repeat with new
  shuffles; same seed -> same batches. `get_state()`/`set_state()` resume exactly and the
  iterator is a grain `DatasetIterator`, so `grain.checkpoint.CheckpointSave(it)` /
  `CheckpointRestore(it)` save it in an Orbax checkpoint. `num_skipped` counts
  undecodable images.
  """
  it_ds, per_process = make_train_dataset(data_cfg, global_batch=global_batch, seed=seed,
                                          process_index=process_index, process_count=process_count)
  return TrainIterator(iter(it_ds), per_process)


# ----------------------------------------------------------------------------- evaluation


def _single_component(data_cfg, name: str | None = None) -> dict[str, Any]:
  comps = _components(data_cfg)
  if name is None:
    return comps[0][0]
  for c, _ in comps:
    if c["name"] == name:
      return c
  raise DataError(f"dataset {name!r} is not in data.mixture; choose one of {[c['name'] for c, _ in comps]}")


def class_names(data_cfg, split: str, dataset: str | None = None) -> list[str]:
  """Class names (text) in label order of `split` (Glyphs metadata or ClassLabel names)."""
  c = _single_component(data_cfg, dataset)
  names = _open(c, split).class_names
  if names is None:
    raise DataError(f"{c['name']} has no class names for data.label_key={c.get('label_key')!r}; "
                    "set label_key to a ClassLabel feature")
  return names


def prompt_templates(data_cfg) -> list[str]:
  """Zero-shot prompt templates ("{}" is replaced by a class name)."""
  t = list(_get(data_cfg, "prompt_templates", ()) or ("{}",))
  for x in t:
    if "{}" not in x:
      raise DataError(f"prompt template {x!r} has no '{{}}' placeholder for the class name")
  return t


def load_split_arrays(data_cfg, split: str, max_examples: int | None = None, *,
                      dataset: str | None = None, seed: int = 0) -> dict[str, Any]:
  """A whole split as numpy arrays, preprocessed like training but without augmentation.

  Returns:
    image: float32 (N, H, W, C); label: int32 (N,); text: list of N str (the example's
    text, or its class name); captions (only with data.text_key): list of N lists of str,
    every text of the example (COCO's `captions/text` gives several, in any number); domain: (N,) int32 domain ids (-1 if none) and font /
    domain_name: list of N str when the dataset has them; codepoint, script (Glyphs);
    class_names: list of str in label order (None without labels); num_skipped: int.
    With `max_examples`, a seeded random subset (kept in storage order).
  """
  c = _single_component(data_cfg, dataset)
  opened = _open(c, split)
  n = len(opened.source)
  idx = np.arange(n)
  if max_examples is not None and max_examples < n:
    idx = np.sort(np.random.default_rng(seed).permutation(n)[:max_examples])
  counter = _SkipCounter()
  proc = ExampleProcessor(c, opened.class_names, None, train=False, counter=counter)
  domain_key = _key_or_none(c.get("domain_key"))
  flat = _flat_features(opened.features)
  domain_names = None
  dfeat = flat.get(domain_key) if domain_key else None
  if dfeat is not None and hasattr(dfeat, "names"):
    domain_names = list(dfeat.names)
  font_list = opened.glyph_meta["fonts"] if opened.glyph_meta else None
  images, labels, texts, captions, domains, dnames, cps, scripts = [], [], [], [], [], [], [], []
  for i in idx:
    ex = opened.source[int(i)]
    out = proc(ex, None)
    if _SKIP in out:
      continue
    label = int(out["label"])
    images.append(out["image"])
    labels.append(label)
    if proc.text_key is not None:
      options = _text_options(_lookup(ex, proc.text_key))
      texts.append(options[0] if options else "")
      captions.append(options)
    elif opened.class_names is not None and label >= 0:
      texts.append(opened.class_names[label])
    else:
      texts.append("")
    if domain_key is not None:
      v = _lookup(ex, domain_key)
      if domain_names is not None:
        domains.append(int(np.asarray(v)))
        dnames.append(domain_names[int(np.asarray(v))])
      elif isinstance(v, (bytes, str)) or (isinstance(v, np.ndarray) and v.dtype.kind in "OSU"):
        s = _as_str(v)
        dnames.append(s)
        domains.append(font_list.index(s) if font_list and s in font_list else -1)
      else:
        domains.append(int(np.asarray(v)))
    if opened.glyph_meta is not None:
      cps.append(int(np.asarray(ex["codepoint"])))
      scripts.append(_as_str(ex["script"]))
  size, ch = int(c["image_size"]), int(c["channels"])
  out = {
      "image": np.stack(images).astype(np.float32) if images else np.zeros((0, size, size, ch), np.float32),
      "label": np.asarray(labels, np.int32),
      "text": texts,
      "domain": np.asarray(domains, np.int32) if domains else np.full((len(labels),), -1, np.int32),
      "class_names": opened.class_names,
      "num_skipped": counter.count,
  }
  if proc.text_key is not None:
    out["captions"] = captions
  if dnames:
    out["domain_name"] = dnames
    if opened.glyph_meta is not None:
      out["font"] = dnames
  if opened.glyph_meta is not None:
    out["codepoint"] = np.asarray(cps, np.int64)
    out["script"] = scripts
  return out
