"""The data `fszjax adapt` evaluates on: the pretrained towers of ``config.init_from``, the
evaluation dataset (the model's own, or another one chosen by ``config.data``), and each
split's frozen features (`SplitData`)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from fszjax import checkpoint, evaluate, inference
from fszjax.data import arrays as arrays_lib
from fszjax.data import defaults, glyphs as glyphs_lib
from fszjax.data.defaults import DATASET_KEYS, data_overrides
from fszjax.fewshot.episodes import AdaptError, SplitData, pixel_vectors
from fszjax.models.two_tower import build_model

GLYPH_TEST_SPLITS = ("test_classes", "test_scripts", "test_fonts", "test_both")


def load_towers(config):
  """(model config, base dir, module, params) of ``config.init_from``: a pretraining
  workdir, a checkpoints directory, one checkpoint step directory, or a directory written
  by `fszjax convert` (open_clip / big_vision)."""
  src = config.init_from
  if not src:
    raise AdaptError("config.init_from is empty; pass --config.init_from=<pretraining workdir, "
                     "checkpoint or converted model>")
  src = os.path.abspath(os.path.expanduser(src))
  if not os.path.exists(src):
    raise AdaptError(f"config.init_from={src} does not exist; run `fszjax pretrain` first or "
                     "pass a checkpoint or converted model directory")
  try:
    pre, base_dir = inference.load_config(src)
  except inference.LoadError as e:
    raise AdaptError(f"config.init_from: {e}") from None
  if "model" not in pre or "data" not in pre:
    raise AdaptError(f"{base_dir} holds no model config (config.json with model and data "
                     "sections); pass a fszjax workdir, checkpoint or converted directory")
  params = checkpoint.load_params_numpy(src)
  return pre, base_dir, build_model(pre.model), jax.tree.map(jnp.asarray, params)


def _is_glyphs(name: str) -> bool:
  base = str(name).split(":")[0]
  return base == "glyphs" or base.startswith("glyphs/")


def eval_data_config(model_data, overrides):
  """The data config `fszjax adapt` evaluates on: the model's data section (preprocessing,
  tokenizer, and by default its dataset) with the adapt config's dataset keys applied."""
  d = model_data.copy_and_resolve_references()
  # Plain dicts from here: `over` is partial by design (None = the model's), and the model's
  # data section is free-form (a model's config.json may predate a data key).
  over = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides or {})
  name = over.get("name")
  with d.ignore_type():
    if name and name != d.get("name"):
      fresh = (defaults.glyphs_data_config() if _is_glyphs(name)
               else defaults.tfds_data_config(str(name)))
      for k in DATASET_KEYS + ("glyphs",):
        d[k] = fresh[k]
      if _is_glyphs(name):
        d.glyphs.image_size = glyphs_lib.DEFAULT_IMAGE_SIZE  # resized to the model's size
      d.mixture = ()
    for k in DATASET_KEYS:
      if over.get(k) is not None:
        d[k] = over[k]
    for k, v in (over.get("glyphs") or {}).items():
      if v is not None:
        if "glyphs" not in d:
          d.glyphs = data_overrides().glyphs
        d.glyphs[k] = v
  return d


def eval_splits(fcfg, data_cfg) -> list:
  """``fewshot.splits``, or when empty the dataset's test splits: Glyphs' four test splits,
  else ``data.eval_splits``."""
  splits = list(fcfg.splits or ())
  if splits:
    return splits
  if _is_glyphs(data_cfg.name) and not data_cfg.get("mixture", ()):
    return list(GLYPH_TEST_SPLITS)
  return list(data_cfg.eval_splits)


def image_feats(encoder, images) -> np.ndarray:
  """L2-normalised float32 image embeddings of an `evaluate.EmbeddingEncoder`."""
  return evaluate.l2_normalize(encoder.images(images)).astype(np.float32)


def split_data(encoder, data_cfg, split, templates, max_examples, keep_images=False) -> SplitData:
  """Frozen features, zero-shot classifier and pixel vectors of one split."""
  arrays = arrays_lib.load_split_arrays(data_cfg, split, max_examples)
  arrays = evaluate.remap_to_present(arrays)
  feats = image_feats(encoder, arrays["image"])
  text = evaluate.zero_shot_classifier(encoder.texts, arrays["class_names"], templates)
  pix = pixel_vectors(arrays["image"])
  return SplitData(feats, np.asarray(arrays["label"]),
                   np.asarray(arrays.get("domain", np.zeros(len(feats), np.int64))),
                   text.astype(np.float32), pix.astype(np.float32), list(arrays["class_names"]),
                   arrays.get("domain_name"), arrays["image"] if keep_images else None)
