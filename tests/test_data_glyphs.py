"""The Glyphs builder on a reduced character set: split invariants, image validity, determinism."""

import collections
import shutil

import numpy as np
import pytest
from data_testlib import glyph_options, glyphs_data_dir

from fszjax.data import glyphs


@pytest.fixture(scope="session")
def gdir(tmp_path_factory):
  return glyphs.dataset_dir(glyph_options(), glyphs_data_dir(tmp_path_factory))


@pytest.fixture(scope="session")
def meta(gdir):
  return glyphs.read_metadata(gdir)


@pytest.fixture(scope="session")
def records(gdir):
  """split -> list of decoded records (image kept as PNG bytes)."""
  import tensorflow_datasets as tfds

  b = tfds.builder_from_directory(gdir)
  out = {}
  for split in glyphs.SPLITS:
    src = b.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    out[split] = [src[i] for i in range(len(src))]
  return out


def _str(v):
  return v.decode() if isinstance(v, bytes) else str(v)


def _chars(meta, split):
  return set(meta["splits"][split]["codepoints"])


def test_every_split_is_populated(meta, records):
  for split in glyphs.SPLITS:
    assert meta["splits"][split]["num_examples"] == len(records[split]) > 0, split


def test_held_out_characters_never_in_train(meta):
  train = _chars(meta, "train")
  assert not train & _chars(meta, "test_classes")
  assert not train & _chars(meta, "test_scripts")
  assert not _chars(meta, "test_classes") & _chars(meta, "test_scripts")
  assert _chars(meta, "test_both") <= _chars(meta, "test_classes") | _chars(meta, "test_scripts")


def test_val_classes_held_out_of_train_and_tests(meta):
  val = _chars(meta, "val_classes")
  assert val, "val_classes is empty"
  for split in ("train", "test_classes", "test_scripts", "test_both", "test_fonts", "val"):
    assert not val & _chars(meta, split), split
  # Source fonts only (no held-out font is seen before testing), same rule as test_classes.
  assert set(meta["splits"]["val_classes"]["fonts"]) <= set(meta["source_fonts"])
  train_words = {w for n in meta["splits"]["train"]["class_names"] for w in n.split()}
  for name in meta["splits"]["val_classes"]["class_names"]:
    assert set(name.split()) <= train_words, name
  assert set(meta["splits"]["val_classes"]["scripts"]) <= set(meta["train_scripts"])


def test_val_classes_leave_test_classes_as_they_were():
  """val_classes is picked after test_classes: a build without it has the same test
  characters; its characters go back to train."""
  with_val = glyphs.build_plan(glyphs.GlyphsOptions(max_chars=60))
  without = glyphs.build_plan(glyphs.GlyphsOptions(max_chars=60, val_class_fraction=0.0))
  cps = lambda p, s: {cp for cp, _, _ in p.examples[s]}
  for split in ("test_classes", "test_scripts", "test_both"):
    assert cps(with_val, split) == cps(without, split), split
  assert not cps(without, "val_classes")
  assert cps(with_val, "val_classes") and cps(with_val, "val_classes") <= cps(without, "train")
  assert cps(without, "train") == cps(with_val, "train") | cps(with_val, "val_classes")


def test_class_fractions_out_of_range_are_errors():
  with pytest.raises(ValueError, match="val_class_fraction"):
    glyphs.GlyphsOptions(val_class_fraction=0.7)
  with pytest.raises(ValueError, match="test_class_fraction"):
    glyphs.GlyphsOptions(test_class_fraction=-0.1)


def test_test_class_names_are_compositional(meta):
  train_words = {w for n in meta["splits"]["train"]["class_names"] for w in n.split()}
  for name in meta["splits"]["test_classes"]["class_names"]:
    missing = [w for w in name.split() if w not in train_words]
    assert not missing, (name, missing)
  # ... and drawn from scripts train covers.
  assert set(meta["splits"]["test_classes"]["scripts"]) <= set(meta["train_scripts"])


def test_held_out_scripts_never_in_train(meta):
  held = set(meta["splits"]["test_scripts"]["scripts"])
  assert held and held <= set(glyphs.DEFAULT_TEST_SCRIPTS)
  assert not held & set(meta["splits"]["train"]["scripts"])


def test_held_out_fonts_never_in_train(meta):
  train_fonts = set(meta["splits"]["train"]["fonts"])
  for split in ("test_fonts", "test_both"):
    fonts = set(meta["splits"][split]["fonts"])
    assert fonts and not fonts & train_fonts, split
    assert fonts <= set(meta["held_out_fonts"])
  assert train_fonts <= set(meta["source_fonts"])


def test_wrong_and_fallback_fonts_are_excluded(meta):
  excluded = meta["excluded_fonts"]
  for f in ("LastResortHE-Regular", "cmsy10", "cmex10", "cmmi10"):
    assert f in excluded
  # cmr10 maps Latin-1 codepoints to other glyphs: found by the agreement check.
  assert "disagree" in excluded["cmr10"]
  assert not [f for f in meta["fonts"] if f.startswith(("cm", "LastResort"))]


def test_records_agree_with_metadata(meta, records):
  for split in glyphs.SPLITS:
    s = meta["splits"][split]
    for r in records[split]:
      cp, label = int(r["codepoint"]), int(r["label"])
      assert s["codepoints"][label] == cp
      assert _str(r["text"]) == s["class_names"][label] == glyphs.char_text(cp)
      assert _str(r["font"]) in s["fonts"]
      assert meta["fonts"][int(r["domain"])] == _str(r["font"])
      assert _str(r["script"]) == glyphs.script_of(cp)


def test_every_train_class_has_several_fonts(meta, records):
  fonts = collections.defaultdict(set)
  for r in records["train"]:
    fonts[int(r["label"])].add(_str(r["font"]))
  assert set(fonts) == set(range(len(meta["splits"]["train"]["class_names"])))
  assert min(len(f) for f in fonts.values()) >= 3


def test_no_blank_or_notdef_images(meta, records):
  import io

  from PIL import Image

  paths = {f.name: f.path for f in glyphs.list_fonts()}
  notdef = {f: glyphs.GlyphRenderer(paths[f], 32).notdef_image() for f in meta["fonts"]}
  for split in glyphs.SPLITS:
    for r in records[split]:
      img = np.asarray(Image.open(io.BytesIO(r["image"])))
      assert img.shape == (32, 32) and img.max() >= 64, (split, int(r["codepoint"]))
      nd = notdef[_str(r["font"])]
      assert nd is None or not np.array_equal(img, nd)


def test_script_of():
  assert glyphs.script_of(ord("α")) == "greek"
  assert glyphs.script_of(ord("A")) == "latin"
  assert glyphs.script_of(ord("Ж")) == "cyrillic"
  assert glyphs.script_of(ord("Ա")) == "armenian"
  assert glyphs.script_of(0x2801) == "braille"
  assert glyphs.script_of(ord("→")) == "arrows"
  assert glyphs.script_of(ord("─")) == "box drawing"
  assert glyphs.script_of(ord("∑")) == "math"
  assert glyphs.script_of(ord("€")) == "currency"
  assert glyphs.char_text(0x3AC) == "greek small letter alpha with tonos"


def test_plan_is_deterministic_and_font_dirs_add_domains(tmp_path):
  src = {f.name: f.path for f in glyphs.list_fonts()}["DejaVuSans"]
  shutil.copy(src, tmp_path / "MyFont.ttf")
  opts = glyphs.GlyphsOptions(max_chars=40, font_dirs=(str(tmp_path),))
  a, b = glyphs.build_plan(opts), glyphs.build_plan(opts)
  assert a.metadata == b.metadata
  for split in glyphs.SPLITS:
    assert [(cp, f) for cp, f, _ in a.examples[split]] == [(cp, f) for cp, f, _ in b.examples[split]]
    assert all(np.array_equal(x[2], y[2]) for x, y in zip(a.examples[split], b.examples[split]))
  assert "MyFont" in a.metadata["source_fonts"]
  assert "MyFont" in a.metadata["splits"]["train"]["fonts"]
  assert glyphs.config_name(opts) != glyphs.config_name(glyphs.GlyphsOptions(max_chars=40))
  assert glyphs.config_name(glyphs.GlyphsOptions()) == "32px"


def test_missing_font_dir_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="--font_dir"):
    glyphs.list_fonts([str(tmp_path / "nope")])
