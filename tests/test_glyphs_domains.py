"""New domains in Glyphs: added fonts held out as test domains, a character split that does
not move when fonts are added, stylistic designs (small caps) accepted, and an existing
model evaluated on the new build with `fszjax adapt`."""

import json
import os
import shutil

import numpy as np
import pytest

import data_testlib
from fszjax.data import glyphs
from fszjax.data.glyphs import agreement as glyph_agreement, plan as glyph_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX = data_testlib.GLYPH_MAX_CHARS


def _font_path(name):
  return {f.name: f.path for f in glyphs.list_fonts()}[name]


@pytest.fixture(scope="module")
def new_fonts(tmp_path_factory):
  """Two 'new' fonts (matplotlib's DejaVu files under other names) in their own directory."""
  d = tmp_path_factory.mktemp("myfonts")
  shutil.copy(_font_path("DejaVuSans"), d / "MyHand-Regular.ttf")
  shutil.copy(_font_path("DejaVuSerif-Bold"), d / "MyHand-Bold.ttf")
  return str(d)


def _roles(meta):
  out = {}
  for split in ("train", "test_classes", "test_scripts"):
    for cp in meta["splits"][split]["codepoints"]:
      out[cp] = split
  return out


def test_added_held_out_fonts_keep_the_character_split(new_fonts):
  base = glyphs.build_plan(glyphs.GlyphsOptions(max_chars=MAX)).metadata
  opts = glyphs.GlyphsOptions(max_chars=MAX, font_dirs=(new_fonts,),
                              held_out_fonts=glyphs.DEFAULT_HELD_OUT_FONTS + (new_fonts,))
  plan = glyphs.build_plan(opts)
  meta = plan.metadata
  assert meta["added_fonts"] == ["MyHand-Bold", "MyHand-Regular"]
  assert {"MyHand-Bold", "MyHand-Regular"} <= set(meta["held_out_fonts"])
  assert not {"MyHand-Bold", "MyHand-Regular"} & set(meta["source_fonts"])
  # Same characters, each in the same split; the training classes are unchanged.
  assert _roles(meta) == _roles(base)
  for split in ("train", "val", "test_classes", "test_scripts"):
    assert meta["splits"][split] == base["splits"][split], split
  # The new fonts only add test-domain examples.
  for split in ("test_fonts", "test_both"):
    assert meta["splits"][split]["num_examples"] > base["splits"][split]["num_examples"]
    fonts = {f for _, f, _ in plan.examples[split]}
    assert {"MyHand-Regular", "MyHand-Bold"} <= fonts
  for split in ("train", "val", "test_classes", "test_scripts"):
    assert not {f for _, f, _ in plan.examples[split]} & {"MyHand-Regular", "MyHand-Bold"}


def test_training_fonts_and_font_patterns_do_not_move_characters(new_fonts):
  """Added as training fonts, or holding out a family by pattern: characters stay put."""
  base = _roles(glyphs.build_plan(glyphs.GlyphsOptions(max_chars=MAX)).metadata)
  meta = glyphs.build_plan(glyphs.GlyphsOptions(
      max_chars=MAX, font_dirs=(new_fonts,),
      held_out_fonts=glyphs.DEFAULT_HELD_OUT_FONTS + ("DejaVu Serif",))).metadata
  assert "MyHand-Regular" in meta["source_fonts"]
  # The family name "DejaVu Serif" (name table) holds out DejaVuSerif* and the renamed copy.
  assert {"DejaVuSerif", "DejaVuSerif-Italic", "MyHand-Bold"} <= set(meta["held_out_fonts"])
  roles = _roles(meta)
  assert all(roles[cp] == r for cp, r in base.items() if cp in roles)
  assert len(set(base) - set(roles)) <= 0.05 * len(base)  # a few lose their >= 3 source fonts


def test_new_character_split_depends_on_the_character_only():
  opts = glyphs.GlyphsOptions()
  words = {"latin", "small", "letter", "capital", "a", "b", "with", "acute"}
  scripts = {"latin"}
  assert glyph_plan.new_char_role(0x0531, opts, words, scripts) == "test_scripts"  # armenian
  roles = [glyph_plan.new_char_role(cp, opts, words, scripts) for cp in (0xE1, 0xC1)]
  assert roles == [glyph_plan.new_char_role(cp, opts, words, scripts) for cp in (0xE1, 0xC1)]
  # The hash band right after test_classes' goes to val_classes.
  lo, hi = opts.test_class_fraction, opts.test_class_fraction + opts.val_class_fraction
  val_cp = next(cp for cp in range(0xC0, 0x250) if lo <= glyphs.split_hash(cp, 0) < hi)
  test_cp = next(cp for cp in range(0xC0, 0x250) if glyphs.split_hash(cp, 0) < lo)
  train_cp = next(cp for cp in range(0xC0, 0x250) if glyphs.split_hash(cp, 0) >= hi)
  every = words | {w for cp in (val_cp, test_cp, train_cp) for w in glyphs.char_text(cp).split()}
  assert glyph_plan.new_char_role(val_cp, opts, every, scripts) == "val_classes"
  assert glyph_plan.new_char_role(test_cp, opts, every, scripts) == "test_classes"
  assert glyph_plan.new_char_role(train_cp, opts, every, scripts) == "train"
  h = [glyphs.split_hash(cp, 0) for cp in range(0x4E00, 0x4E00 + 2000)]
  assert 0.07 < np.mean(np.asarray(h) < 0.1) < 0.13 and h == [glyphs.split_hash(cp, 0)
                                                            for cp in range(0x4E00, 0x4E00 + 2000)]


def _unicase_font(src, dst):
  """A copy of `src` whose cmap draws lowercase Latin letters with the capitals' glyphs."""
  from fontTools.ttLib import TTFont

  font = TTFont(src)
  for table in font["cmap"].tables:
    if table.isUnicode():
      for cp in range(ord("a"), ord("z") + 1):
        if ord(chr(cp).upper()) in table.cmap:
          table.cmap[cp] = table.cmap[ord(chr(cp).upper())]
      for cp in range(0xE0, 0xFF):
        up = ord(chr(cp).upper()) if len(chr(cp).upper()) == 1 else None
        if up and up in table.cmap and cp in table.cmap and up != cp:
          table.cmap[cp] = table.cmap[up]
  font.save(dst)


def test_unicase_font_is_not_a_wrong_cmap(tmp_path):
  d = tmp_path / "caps"
  d.mkdir()
  _unicase_font(_font_path("DejaVuSans"), str(d / "CapsOnly.ttf"))
  meta = glyphs.build_plan(glyphs.GlyphsOptions(max_chars=MAX, font_dirs=(str(d),))).metadata
  assert "CapsOnly" not in meta["excluded_fonts"] and "CapsOnly" in meta["fonts"]


def test_small_caps_renderings_agree_with_the_other_case():
  """A font drawing 'a'..'z' as capitals under distinct glyph names (small caps) is kept;
  a font drawing other characters' shapes is a wrong cmap."""
  fonts = ["DejaVuSans", "DejaVuSerif", "DejaVuSansMono", "DejaVuSans-Bold"]
  renderers = {f: glyphs.GlyphRenderer(_font_path(f), 32) for f in fonts}
  letters = [ord(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"]
  images = {(cp, f): renderers[f].render(chr(cp)) for cp in letters for f in fonts}
  cmaps = {f: {cp: f"g{cp}" for cp in letters} for f in fonts + ["SmallCaps", "Wrong"]}
  for cp in letters:
    images[cp, "SmallCaps"] = images[ord(chr(cp).upper()), "DejaVuSerif"]
    images[cp, "Wrong"] = images[letters[(letters.index(cp) + 7) % len(letters)], "DejaVuSerif"]
  out = glyph_agreement.disagreeing_fonts(letters, fonts + ["SmallCaps", "Wrong"], images, cmaps,
                                  judge=["SmallCaps", "Wrong"])
  assert "SmallCaps" not in out and "Wrong" in out


def test_held_out_pattern_matching_no_font_is_a_user_error():
  from fszjax.errors import is_user_error

  with pytest.raises(glyphs.GlyphsError, match="matches no font") as e:
    glyphs.build_plan(glyphs.GlyphsOptions(max_chars=MAX, held_out_fonts=("NoSuchFont*",)))
  assert is_user_error(e.value) and "\n" not in str(e.value)


def test_existing_model_evaluated_on_a_held_out_font_directory(gdir, new_fonts, tmp_path):
  """Prepare a build with a held-out font directory (CLI), then `fszjax adapt` a model
  pretrained on the default build on it: the new fonts are test domains of the results."""
  from fszjax import config as config_lib, pretrain
  from fszjax.data import cli as data_cli
  from fszjax.fewshot import adapt

  pre = str(tmp_path / "pre")
  cfg = config_lib.load_config(os.path.join(ROOT, "configs/glyphs.py"), [
      f"--config.data.data_dir={gdir}",
      *data_testlib.tiny_run_overrides(total_steps=2, max_examples=16, max_chars=MAX)])
  pretrain.train(cfg, pre)

  data_dir = str(tmp_path / "data")
  assert data_cli.main(["prepare", "glyphs", "--data_dir", data_dir, "--max_chars", str(MAX),
                        "--heldout_font_dir", new_fonts]) == 0
  opts = glyphs.GlyphsOptions(max_chars=MAX, font_dirs=(new_fonts,),
                              held_out_fonts=glyphs.DEFAULT_HELD_OUT_FONTS + (new_fonts,))
  name = f"glyphs/{glyphs.config_name(opts)}"
  assert glyphs.is_prepared(opts, data_dir)
  wd = str(tmp_path / "adapt")
  acfg = config_lib.load_config(os.path.join(ROOT, "configs/glyphs_fewshot.py"), [
      f"--config.init_from={pre}", f"--config.data.data_dir={data_dir}",
      f"--config.data.name={name}",
      "--config.fewshot.splits=['test_fonts']", "--config.fewshot.settings=['5way1shot']",
      "--config.fewshot.episodes=10", "--config.fewshot.q_query=1",
      "--config.fewshot.meta.steps=0", "--config.fewshot.head_steps=1",
      "--config.fewshot.probe_steps=2", "--config.fewshot.dg.steps=1",
      "--config.fewshot.dg.batch_size=8", "--config.fewshot.dg.settings=['5way1shot']",
      "--config.fewshot.dg.splits=['test_fonts']"])
  res = adapt.run(acfg, wd)
  per_font = res["dg"]["per_font"]["test_fonts"]["pretrained"]
  assert {"MyHand-Regular", "MyHand-Bold"} <= set(per_font)
  assert 0.0 <= per_font["MyHand-Regular"] <= 1.0
  r = res["methods"]["zeroshot"]["test_fonts"]["5way1shot"]
  assert r["episodes"] == 10 and 0.0 <= r["mean"] <= 1.0
  saved = json.load(open(os.path.join(wd, "results.json")))
  assert saved["methods"]["zeroshot"]["test_fonts"]["5way1shot"] == r
  # The model's own tokenizer encoded the class names: none was trained for the new build.
  assert not os.path.exists(os.path.join(glyphs.dataset_dir(opts, data_dir), "fszjax_tokenizer"))
