"""Shared helpers of the data tests: a small Glyphs build (built once per session) and
tiny users' datasets written into temporary directories. Nothing is downloaded."""

from __future__ import annotations

import os

import numpy as np

GLYPH_MAX_CHARS = 150


def glyph_options():
  from fszjax.data import glyphs

  return glyphs.GlyphsOptions(max_chars=GLYPH_MAX_CHARS)


def glyphs_data_dir(tmp_path_factory) -> str:
  """Prepares the reduced Glyphs build once per session (prepare() is idempotent)."""
  import tensorflow_datasets as tfds

  from fszjax.data import glyphs

  data_dir = str(tmp_path_factory.getbasetemp() / "fszjax_glyphs_data")
  if not glyphs.is_prepared(glyph_options(), data_dir):
    tfds.disable_progress_bar()
    glyphs.prepare(glyph_options(), data_dir)
  return data_dir


def tiny_run_overrides(total_steps: int = 3, max_examples: int = 32,
                       max_chars: int = GLYPH_MAX_CHARS) -> list[str]:
  """`--config.*` overrides of configs/glyphs.py for a tiny pretraining run (seconds)."""
  return [
      f"--config.data.glyphs.max_chars={max_chars}",
      "--config.data.tokenizer.vocab_size=256", "--config.model.text.vocab_size=256",
      "--config.data.num_threads=1", "--config.batch_size=16", "--config.model.embed_dim=16",
      "--config.model.image.width=32", "--config.model.image.depth=1",
      "--config.model.image.mlp_dim=64", "--config.model.image.num_heads=2",
      "--config.model.image.patch_size=8", "--config.model.text.width=32",
      "--config.model.text.depth=1", "--config.model.text.mlp_dim=64",
      "--config.model.text.num_heads=2", f"--config.total_steps={total_steps}",
      "--config.eval_every=0", f"--config.eval.max_examples={max_examples}",
      "--config.progress=False", "--config.checkpoint.best_metric="]


def glyph_cfg(data_dir: str, **overrides):
  """The default glyphs data config pointed at the test build (small tokenizer)."""
  from fszjax.data import defaults

  cfg = defaults.glyphs_data_config()
  cfg.data_dir = data_dir
  cfg.glyphs.max_chars = GLYPH_MAX_CHARS
  cfg.tokenizer.vocab_size = 256
  cfg.num_threads = 1
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def write_image_folder(root: str, *, classes=("zebra", "yak", "ibis"), per_class: int = 4,
                       domains=None, corrupt: int = 0, size=(10, 12)) -> str:
  """root/<class>/i.png (or root/<domain>/<class>/i.png): every image a distinct gray level."""
  from PIL import Image

  level = 0
  for dom in (domains or [None]):
    for cls in classes:
      d = os.path.join(root, *( [dom] if dom else []), cls)
      os.makedirs(d, exist_ok=True)
      for k in range(per_class):
        level += 1
        Image.fromarray(np.full(size + (3,), 5 * level, np.uint8)).save(os.path.join(d, f"{k}.png"))
  for k in range(corrupt):
    with open(os.path.join(root, *([domains[0]] if domains else []), classes[0], f"bad{k}.jpg"), "wb") as f:
      f.write(b"\xff\xd8 this is not a jpeg")
  return root
