"""The Glyphs specifics of reading a data config: options, directory, metadata, extra fields.

`fszjax.data.sources` asks this adapter whether a dataset name is Glyphs
(`is_glyphs`) and, if so, where it is prepared (`dataset_dir_of`) and what to run
when it is not (`prepare_command`); `fszjax.data.arrays` adds its per-example fields
(`example_fields`: codepoint, script).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fszjax.data import glyphs as glyphs_lib
from fszjax.data import preprocess


def is_glyphs(base: str) -> bool:
  """Whether dataset name `base` (without ":version") is Glyphs or one of its configs."""
  return base == glyphs_lib.NAME or base.startswith(glyphs_lib.NAME + "/")


def options_from_config(cfg: dict[str, Any]) -> glyphs_lib.GlyphsOptions:
  """The `GlyphsOptions` of a data config (``data.glyphs`` over ``data.image_size``)."""
  g = cfg.get("glyphs") or {}
  size = g.get("image_size") or cfg.get("image_size") or glyphs_lib.DEFAULT_IMAGE_SIZE
  held = tuple(glyphs_lib.DEFAULT_HELD_OUT_FONTS) + tuple(g.get("held_out_fonts") or ())
  return glyphs_lib.GlyphsOptions(image_size=int(size), font_dirs=tuple(g.get("font_dirs") or ()),
                                  max_chars=g.get("max_chars"), held_out_fonts=held)


def config_name(cfg: dict[str, Any]) -> str | None:
  """The Glyphs builder config a data config reads (None for other datasets)."""
  if cfg["name"].split(":")[0] == glyphs_lib.NAME:
    return glyphs_lib.config_name(options_from_config(cfg))
  return None


def prepare_command(cfg: dict[str, Any], data_dir: str) -> str:
  """The `fszjax prepare glyphs ...` command that writes what `cfg` reads."""
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


def version_dirs(path: str) -> list[str]:
  """The versions prepared under a dataset directory (those with dataset_info.json), oldest first."""
  if not os.path.isdir(path):
    return []
  vs = [d for d in os.listdir(path) if os.path.exists(os.path.join(path, d, "dataset_info.json"))]
  return sorted(vs, key=lambda v: tuple(int(x) if x.isdigit() else 0 for x in v.split(".")))


def dataset_dir_of(cfg: dict[str, Any], base: str, data_dir: str) -> str:
  """The directory Glyphs dataset `base` of `cfg` is (or would be) prepared in."""
  if base == glyphs_lib.NAME:
    return glyphs_lib.dataset_dir(options_from_config(cfg), data_dir)
  vs = version_dirs(os.path.join(data_dir, base))
  return os.path.join(data_dir, base, vs[-1]) if vs else os.path.join(data_dir, base, glyphs_lib.VERSION)


def split_class_names(meta: dict[str, Any], name: str, split: str) -> list[str] | None:
  """Class names of `split` from the Glyphs metadata; None when the split does not exist."""
  split_name = split.split("[")[0]
  if split_name not in meta["splits"]:
    return None
  return list(meta["splits"][split_name]["class_names"])


def example_fields(ex: dict) -> tuple[int, str]:
  """(codepoint, script) of one Glyphs example."""
  return int(np.asarray(ex["codepoint"])), preprocess.as_str(ex["script"])
