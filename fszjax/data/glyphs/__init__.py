"""Glyphs: an Omniglot-like image-text dataset rendered from real TrueType fonts.

One example per (character, font): a grayscale image of the character (white ink on
black, centred, size normalised per font), its Unicode name as text
("greek small letter alpha with tonos"), a class id, the codepoint, a coarse script
("latin", "greek", "arrows", ...) and the font (the domain).

Material: the fonts shipped inside matplotlib's wheel (DejaVu Sans/Serif/Mono and their
bold/oblique variants, STIX, Computer Modern) plus any `font_dirs` the user adds. What is
not a real glyph is skipped: characters missing from a font's cmap or mapped to
`.notdef`, blank renderings, fallback fonts (LastResort, any font mapping > 60k
codepoints), and renderings that disagree with the other fonts (fonts with legacy
encodings such as the TeX cm* fonts map ASCII codepoints to other symbols: whole fonts
whose renderings mostly disagree are dropped, single disagreeing glyphs too).

Splits (characters are classes, fonts are domains):

  train         background characters x source fonts
  val           one held-out example of some train characters (source fonts)
  val_classes   characters never in train nor in any test split (source fonts only), under
                test_classes' rule: for choosing hyper-parameters of few-shot methods on
                characters the model was not trained on (1.1.0)
  test_classes  characters never in train, from scripts train covers, every word of their
                names occurring in train names (compositional zero-shot)
  test_scripts  whole scripts never in train (armenian, georgian, braille, lao): few-shot
                transfer to new alphabets
  test_fonts    train characters in held-out fonts (domain shift)
  test_both     held-out characters in held-out fonts

Stable character split: a character's split (train / val_classes / test_classes /
test_scripts) depends on the character only, never on the fonts added. Characters that
matplotlib's fonts cover keep the split the default build gives them (computed from
matplotlib's fonts alone, with the default held-out fonts); characters only the added fonts
cover go to test_scripts by script, else to test_classes or val_classes by a hash of their
code point (when every word of their name is a train word), else to train. The default
build is unchanged by this rule. Adding fonts or holding out other fonts therefore never
turns a held-out character of an existing model into a training class: it adds examples
(and new characters) only.

Held-out fonts (`held_out_fonts`): fnmatch patterns of font names (file stems, e.g.
"STIX*"), of family names (from the font's name table, e.g. "Roboto Slab"), or
directories (every font under one, e.g. a whole `--font_dir`). Held-out fonts give only
test_fonts / test_both examples.

Labels: train, val and test_fonts share the train label space; every other split has its
own (0..K-1, codepoint order). `metadata.json` in the dataset directory holds, per split,
the class names in label order (see `read_metadata`).

Everything is deterministic: same fonts and options -> same dataset.
"""

# The docstring above is the dataset's TFDS description. Modules: `scripts` (characters and
# their scripts), `fonts` (font files, cmaps, held-out fonts), `render` (drawing one font's
# glyphs), `agreement` (fonts that disagree with the others), `options` (`GlyphsOptions`,
# constants, config names), `plan` (`build_plan`: the whole dataset in memory); this package
# holds the TFDS builder and `prepare`.

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import time
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

from fszjax.data.glyphs.fonts import FontFile, list_fonts, matplotlib_font_dir, read_cmap
from fszjax.data.glyphs.options import (DEFAULT_HELD_OUT_FONTS, DEFAULT_IMAGE_SIZE,
                                        DEFAULT_TEST_SCRIPTS, NAME, SPLITS, TRAIN_LABEL_SPLITS,
                                        VERSION, GlyphsError, GlyphsOptions, config_name)
from fszjax.data.glyphs.plan import GlyphsPlan, build_plan
from fszjax.data.glyphs.render import GlyphRenderer
from fszjax.data.glyphs.scripts import char_text, is_candidate_char, script_of, split_hash

log = logging.getLogger(__name__)

_VERSION = VERSION  # the TFDS builder's class attribute VERSION shadows the module's

__all__ = [
    "DEFAULT_HELD_OUT_FONTS", "DEFAULT_IMAGE_SIZE", "DEFAULT_TEST_SCRIPTS", "NAME", "SPLITS",
    "TRAIN_LABEL_SPLITS", "VERSION", "FontFile", "GlyphRenderer", "GlyphsError",
    "GlyphsOptions", "GlyphsPlan", "build_plan", "builder_class", "char_text", "config_name",
    "dataset_dir", "default_data_dir", "is_candidate_char", "is_prepared", "list_fonts",
    "matplotlib_font_dir", "prepare", "read_cmap", "read_metadata", "script_of", "split_hash",
]


def _png(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img, mode="L").save(buf, format="PNG", optimize=False)
  return buf.getvalue()


def _make_builder_class():
  """Defines the TFDS builder lazily (importing TFDS registers it as "glyphs")."""
  # tensorflow_datasets: heavy to import (seconds) and importing it registers builders;
  # loaded only when a dataset is built, so reading a plan or the metadata never needs it.
  import tensorflow_datasets as tfds  # noqa: PLC0415  (heavy; only when building)

  @dataclasses.dataclass(eq=False)
  class GlyphsConfig(tfds.core.BuilderConfig):
    """A Glyphs build; `options` holds everything that determines it."""

    options: GlyphsOptions = GlyphsOptions()

  class Glyphs(tfds.core.GeneratorBasedBuilder):
    """Characters x fonts rendered from real TrueType fonts (see `fszjax.data.glyphs`)."""

    VERSION = tfds.core.Version(_VERSION)
    RELEASE_NOTES = {"1.0.0": "First release.",
                     "1.1.0": "val_classes: characters held out for model selection."}
    BUILDER_CONFIGS = [GlyphsConfig(name=config_name(GlyphsOptions()), options=GlyphsOptions())]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # noqa: N805  (editable installs confuse TFDS's resource lookup)
      return _code_path()

    def __init__(self, *, options: GlyphsOptions | None = None, **kwargs):
      if options is not None and "config" not in kwargs:
        name = config_name(options)
        known = {c.name: c for c in self.BUILDER_CONFIGS}
        kwargs["config"] = name if name in known and known[name].options == options else GlyphsConfig(
            name=name, options=options)
      super().__init__(**kwargs)
      self._plan: GlyphsPlan | None = None

    def _info(self):
      s = self.builder_config.options.image_size
      return tfds.core.DatasetInfo(
          builder=self,
          description=__doc__,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(s, s, 1), encoding_format="png"),
              "label": np.int64,
              "codepoint": np.int64,
              "text": tfds.features.Text(),
              "script": tfds.features.Text(),
              "font": tfds.features.Text(),
              "domain": np.int64,
          }),
          supervised_keys=("image", "label"),
          metadata=tfds.core.MetadataDict(),
          homepage="https://matplotlib.org (fonts: DejaVu, STIX)",
          license="Fonts: Bitstream Vera / DejaVu license and SIL OFL 1.1 (STIX)",
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      self._plan = build_plan(self.builder_config.options)
      self.info.metadata.update(self._plan.metadata)
      return {s: self._generate_examples(s) for s in SPLITS}

    def _generate_examples(self, split):
      meta = self._plan.metadata
      labels = {cp: i for i, cp in enumerate(meta["splits"][split]["codepoints"])}
      domains = {f: i for i, f in enumerate(meta["fonts"])}
      for cp, font, img in self._plan.examples[split]:
        yield f"{cp:06x}-{font}", {
            "image": _png(img),
            "label": labels[cp],
            "codepoint": cp,
            "text": char_text(cp),
            "script": script_of(cp),
            "font": font,
            "domain": domains[font],
        }

  return Glyphs, GlyphsConfig


_BUILDER = None


def _code_path():
  return epath.Path(os.path.abspath(__file__))


def builder_class():
  """The registered TFDS builder class `Glyphs` (and its config class)."""
  global _BUILDER
  if _BUILDER is None:
    _BUILDER = _make_builder_class()
  return _BUILDER


def default_data_dir(data_dir: str | None = None) -> str:
  """`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (TFDS's own default)."""
  if data_dir:
    return os.path.abspath(os.path.expanduser(data_dir))
  return os.path.abspath(os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")))


def dataset_dir(options: GlyphsOptions = GlyphsOptions(), data_dir: str | None = None) -> str:
  """Where a build lives: <data_dir>/glyphs/<config name>/<version>."""
  return os.path.join(default_data_dir(data_dir), NAME, config_name(options), VERSION)


def is_prepared(options: GlyphsOptions = GlyphsOptions(), data_dir: str | None = None) -> bool:
  return os.path.exists(os.path.join(dataset_dir(options, data_dir), "dataset_info.json"))


def prepare(options: GlyphsOptions = GlyphsOptions(), data_dir: str | None = None) -> str:
  """Builds Glyphs (ArrayRecord) into `data_dir` unless already there; returns its directory.

  TFDS writes into a temporary directory and renames it when complete, so a failure
  leaves no half-written dataset behind.
  """
  if is_prepared(options, data_dir):
    return dataset_dir(options, data_dir)
  glyphs_cls, _ = builder_class()
  t0 = time.perf_counter()
  log.info("glyphs: rendering and writing %s into %s", config_name(options), default_data_dir(data_dir))
  # TFDS prints "Downloading and preparing dataset ..." (nothing is downloaded) and warns
  # about the custom config at every build: kept out of the log.
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      builder = glyphs_cls(options=options, data_dir=default_data_dir(data_dir),
                           file_format="array_record")
      builder.download_and_prepare(file_format="array_record")
  finally:
    absl_log.setLevel(level)
  log.info("glyphs: prepared in %.1f s", time.perf_counter() - t0)
  return dataset_dir(options, data_dir)


def read_metadata(directory: str) -> dict[str, Any]:
  """The metadata of a prepared build (`metadata.json` in its dataset directory)."""
  path = os.path.join(directory, "metadata.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found; re-run `fszjax prepare glyphs` for this data_dir")
  with open(path) as f:
    return json.load(f)
