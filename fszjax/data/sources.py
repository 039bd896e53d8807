"""Dataset lookup: which prepared dataset a data config names, opened for random access.

`open_split` finds a split in ``data.data_dir`` (Glyphs through `glyph_source`, a
prepared folder / captions dataset, or the TFDS catalog), opens it with
``tfds.data_source`` (ArrayRecord, no TensorFlow with ``image_decoder='pil'``) and checks
the configured feature keys; its errors name the `fszjax prepare ...` command to run.
`components` reads a (mixture) data config; `class_names` / `prompt_templates` give what
zero-shot evaluation needs.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from fszjax.data import glyph_source
from fszjax.data import glyphs as glyphs_lib
from fszjax.data.errors import DataError, DataNotPreparedError, FeatureKeyError
from fszjax.data.preprocess import key_or_none, to_plain


def cfg_get(cfg, key, default=None):
  """`cfg[key]` of a dict, ConfigDict or object; `default` when absent."""
  if cfg is None:
    return default
  if isinstance(cfg, dict):
    return cfg.get(key, default)
  try:
    return cfg.get(key, default)
  except AttributeError:
    return getattr(cfg, key, default)



def components(data_cfg) -> list[tuple[dict[str, Any], float]]:
  """The (config, weight) of each dataset: the mixture entries over the base config."""
  base = to_plain(data_cfg)
  mixture = base.pop("mixture", None) or ()
  if not mixture:
    return [(base, 1.0)]
  out = []
  for i, entry in enumerate(mixture):
    entry = dict(to_plain(entry))
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



def single_component(data_cfg, name: str | None = None) -> dict[str, Any]:
  """The config of dataset `name` of a mixture (the first one without a name)."""
  comps = components(data_cfg)
  if name is None:
    return comps[0][0]
  for c, _ in comps:
    if c["name"] == name:
      return c
  raise DataError(f"dataset {name!r} is not in data.mixture; choose one of {[c['name'] for c, _ in comps]}")



class Opened:
  """A dataset split opened for random access, with its feature spec and class names."""

  def __init__(self, name, split, source, features, dataset_dir, class_names, glyph_meta=None):
    self.name = name
    self.split = split
    self.source = source
    self.features = features
    self.dataset_dir = dataset_dir  # where the tokenizer cache goes by default
    self.class_names = class_names
    self.glyph_meta = glyph_meta


def flat_features(features, prefix="") -> dict[str, Any]:
  """'a/b' -> feature for every (nested) feature of a FeaturesDict."""
  import tensorflow_datasets as tfds  # noqa: PLC0415  (optional where only `bench` runs)

  out = {}
  items = features.items() if hasattr(features, "items") else []
  for k, f in items:
    path = f"{prefix}{k}"
    out[path] = f
    inner = f.feature if isinstance(f, tfds.features.Sequence) else f
    if isinstance(inner, tfds.features.FeaturesDict):
      out.update(flat_features(inner, path + "/"))
  return out


def _check_keys(opened_name: str, features, keys: dict[str, str | None]) -> None:
  flat = flat_features(features)
  for field, key in keys.items():
    if key is not None and key not in flat:
      raise FeatureKeyError(
          f"feature key {key!r} (data.{field}) is not in {opened_name}; available keys: "
          f"{', '.join(sorted(flat))}")


def _decoders(features, image_key: str, image_decoder: str):
  import tensorflow_datasets as tfds  # noqa: PLC0415  (optional where only `bench` runs)

  if image_decoder == "tfds":
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
  import tensorflow_datasets as tfds  # noqa: PLC0415  (optional where only `bench` runs)

  if label_key is None:
    return None
  f = flat_features(features).get(label_key)
  if isinstance(f, tfds.features.ClassLabel):
    return [n.replace("_", " ") for n in f.names]
  return None


def _builder(cfg: dict[str, Any], name: str, data_dir: str):
  """(TFDS builder, its directory, Glyphs metadata or None) of dataset `name`."""
  import tensorflow_datasets as tfds  # noqa: PLC0415  (optional where only `bench` runs)

  base = name.split(":")[0]
  if glyph_source.is_glyphs(base):
    ddir = glyph_source.dataset_dir_of(cfg, base, data_dir)
    if not os.path.exists(os.path.join(ddir, "dataset_info.json")):
      raise DataNotPreparedError(f"dataset {name} is not prepared in {data_dir}; run "
                                 f"`{glyph_source.prepare_command(cfg, data_dir)}`")
    return tfds.builder_from_directory(ddir), ddir, glyphs_lib.read_metadata(ddir)
  local = os.path.join(data_dir, base)
  vs = glyph_source.version_dirs(local)
  if vs:
    ddir = os.path.join(local, vs[-1])
    return tfds.builder_from_directory(ddir), ddir, None
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
  return builder, str(builder.data_dir), None


def _data_source(builder, name: str, split: str, decoders, data_dir: str):
  """``builder.as_data_source(split)``; its failures become errors naming the fix."""
  try:
    return builder.as_data_source(split=split, decoders=decoders)
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


def _split_class_names(cfg, name: str, split: str, features, glyph_meta) -> list[str] | None:
  """Class names of `split`: data.class_names_file, else Glyphs metadata / ClassLabel names."""
  if glyph_meta is not None:
    class_names = glyph_source.split_class_names(glyph_meta, name, split)
    if class_names is None:
      available = ", ".join(glyph_meta["splits"])
      raise DataError(f"split {split!r} is not in {name}; available splits: {available}")
  else:
    class_names = _class_names_from_features(features, key_or_none(cfg.get("label_key")))
  names_file = cfg.get("class_names_file")
  if names_file:
    if not os.path.exists(names_file):
      raise DataError(f"data.class_names_file {names_file!r} not found; give a text file with one "
                      "name per line")
    with open(names_file, encoding="utf-8") as f:
      class_names = [line.strip() for line in f if line.strip()]
  return class_names


def open_split(cfg: dict[str, Any], split: str) -> Opened:
  """Opens `split` of the dataset named in `cfg` (glyphs, a prepared directory or the catalog)."""
  name = cfg["name"]
  data_dir = glyphs_lib.default_data_dir(cfg.get("data_dir"))
  image_key = cfg.get("image_key") or "image"
  builder, ddir, glyph_meta = _builder(cfg, name, data_dir)
  features = builder.info.features
  _check_keys(name, features, {"image_key": image_key, "label_key": key_or_none(cfg.get("label_key")),
                               "text_key": key_or_none(cfg.get("text_key")),
                               "domain_key": key_or_none(cfg.get("domain_key"))})
  decoders = _decoders(features, image_key, cfg.get("image_decoder") or "pil")
  source = _data_source(builder, name, split, decoders, data_dir)
  class_names = _split_class_names(cfg, name, split, features, glyph_meta)
  return Opened(name, split, source, features, ddir, class_names, glyph_meta)


def class_names(data_cfg, split: str, dataset: str | None = None) -> list[str]:
  """Class names (text) in label order of `split` (Glyphs metadata or ClassLabel names)."""
  c = single_component(data_cfg, dataset)
  names = open_split(c, split).class_names
  if names is None:
    raise DataError(f"{c['name']} has no class names for data.label_key={c.get('label_key')!r}; "
                    "set label_key to a ClassLabel feature")
  return names


def prompt_templates(data_cfg) -> list[str]:
  """Zero-shot prompt templates ("{}" is replaced by a class name)."""
  t = list(cfg_get(data_cfg, "prompt_templates", ()) or ("{}",))
  for x in t:
    if "{}" not in x:
      raise DataError(f"prompt template {x!r} has no '{{}}' placeholder for the class name")
  return t
