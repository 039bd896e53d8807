"""Glyphs build options, constants, the config name of a build and the Glyphs user error."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from fszjax.data.glyphs.fonts import list_fonts
from fszjax.errors import UserError


class GlyphsError(UserError):
  """A Glyphs build cannot be made as asked; the message names the fix."""


VERSION = "1.1.0"  # 1.1.0: the val_classes split (characters held out for model selection)
NAME = "glyphs"
SPLITS = ("train", "val", "val_classes", "test_classes", "test_scripts", "test_fonts", "test_both")
# Splits whose labels index the train class list.
TRAIN_LABEL_SPLITS = ("train", "val", "test_fonts")

DEFAULT_IMAGE_SIZE = 32
DEFAULT_HELD_OUT_FONTS = ("STIX*", "cm*")
DEFAULT_TEST_SCRIPTS = ("armenian", "georgian", "braille", "lao")


@dataclasses.dataclass(frozen=True)
class GlyphsOptions:
  """Everything that determines a Glyphs build (same options + same fonts -> same data).

  image_size: side of the square grayscale images.
  font_dirs: extra directories of .ttf/.otf fonts; each font is a new domain (source
    domain unless its name matches `held_out_fonts`).
  max_chars: keep at most this many characters (stratified by script) for fast tests.
  held_out_fonts: fonts kept out of training (test_fonts / test_both): fnmatch patterns
    of font names or family names, or directories (every font under one).
  test_scripts: scripts held out entirely (test_scripts split).
  min_fonts: a character needs a valid rendering in at least this many fonts.
  test_class_fraction: fraction of background characters held out as test_classes.
  val_class_fraction: fraction of background characters held out as val_classes (never
    trained on, never tested on: the split that selects hyper-parameters of few-shot
    methods on characters the model has not seen).
  val_fraction: val size as a fraction of train examples (one example per val class).
  seed: seed of every random choice in the split.
  """

  image_size: int = DEFAULT_IMAGE_SIZE
  font_dirs: tuple[str, ...] = ()
  max_chars: int | None = None
  held_out_fonts: tuple[str, ...] = DEFAULT_HELD_OUT_FONTS
  test_scripts: tuple[str, ...] = DEFAULT_TEST_SCRIPTS
  min_fonts: int = 8
  test_class_fraction: float = 0.1
  val_class_fraction: float = 0.05
  val_fraction: float = 0.05
  seed: int = 0

  def __post_init__(self):
    if int(self.image_size) < 8:
      raise ValueError(f"glyphs image_size={self.image_size} is too small; use >= 8 (default 32)")
    for name in ("test_class_fraction", "val_class_fraction"):
      if not 0.0 <= float(getattr(self, name)) < 0.5:
        raise ValueError(f"glyphs {name}={getattr(self, name)} is out of range; use a fraction "
                         "in [0, 0.5)")
    if self.max_chars is not None and int(self.max_chars) < 20:
      raise ValueError(f"glyphs max_chars={self.max_chars} is too small; use >= 20 or None (all)")
    object.__setattr__(self, "font_dirs", tuple(os.path.abspath(d) for d in self.font_dirs))
    object.__setattr__(self, "held_out_fonts", tuple(dict.fromkeys(
        os.path.abspath(h) if os.path.isdir(h) else str(h) for h in self.held_out_fonts)))
    object.__setattr__(self, "test_scripts", tuple(s.lower() for s in self.test_scripts))


def config_name(options: GlyphsOptions) -> str:
  """The TFDS config name of a build: "32px" for the defaults, else "32px_max200_<hash>"."""
  default = GlyphsOptions(image_size=options.image_size, max_chars=options.max_chars)
  name = f"{options.image_size}px"
  if options.max_chars is not None:
    name += f"_max{options.max_chars}"
  if options != default:
    extra = list_fonts(options.font_dirs, include_matplotlib=False)
    fonts = [(f.name, os.path.getsize(f.path)) for f in extra]
    blob = json.dumps([dataclasses.asdict(options), fonts], sort_keys=True, default=str)
    name += "_" + hashlib.sha1(blob.encode()).hexdigest()[:8]
  return name
