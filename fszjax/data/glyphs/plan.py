"""The Glyphs plan: which fonts, which characters, every rendering, and the split.

`build_plan` runs the steps in order: usable fonts (`_usable_fonts`), the characters to
render (`_candidates`), rendering (`_render`), dropping fonts that disagree with the others
(`_drop_disagreeing`), the character split (`_character_roles`), the example split
(`_split_pairs`) and the metadata (`_metadata`). See `fszjax.data.glyphs` for the splits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np

from fszjax.data.glyphs.agreement import disagreeing_fonts
from fszjax.data.glyphs.fonts import (FALLBACK_CMAP_SIZE, FALLBACK_FONTS, SYMBOL_FONTS, FontFile,
                                      held_out_matcher, list_fonts, matches, matplotlib_font_dir,
                                      read_cmap)
from fszjax.data.glyphs.options import (DEFAULT_HELD_OUT_FONTS, SPLITS, TRAIN_LABEL_SPLITS,
                                        VERSION, GlyphsError, GlyphsOptions)
from fszjax.data.glyphs.render import GlyphRenderer
from fszjax.data.glyphs.scripts import char_text, is_candidate_char, script_of, split_hash

log = logging.getLogger(__name__)


def _subsample_chars(chars: list[int], max_chars: int, seed: int) -> list[int]:
  """A deterministic, script-stratified subset of `chars` (every script keeps >= 4)."""
  by_script: dict[str, list[int]] = {}
  for cp in chars:
    by_script.setdefault(script_of(cp), []).append(cp)
  rng = np.random.default_rng(seed)
  n = len(chars)
  keep: list[int] = []
  for script in sorted(by_script):
    cps = by_script[script]
    k = min(len(cps), max(4, int(round(max_chars * len(cps) / n))))
    keep += [cps[i] for i in sorted(rng.permutation(len(cps))[:k])]
  if len(keep) > max_chars:
    keep = [keep[i] for i in sorted(rng.permutation(len(keep))[:max_chars])]
  return sorted(keep)


def _pick_test_classes(background: list[int], target: int, rng: np.random.Generator) -> set[int]:
  """Up to `target` held-out characters whose every name word (and script) stays in the
  remaining train set.

  Greedy over a seeded permutation: a character moves to the test set only if each of its
  words (and its script) is still carried by at least one other train character.
  """
  words = {cp: set(char_text(cp).split()) for cp in background}
  word_count: dict[str, int] = {}
  script_count: dict[str, int] = {}
  for cp in background:
    for w in words[cp]:
      word_count[w] = word_count.get(w, 0) + 1
    s = script_of(cp)
    script_count[s] = script_count.get(s, 0) + 1
  chosen: set[int] = set()
  for i in rng.permutation(len(background)):
    if len(chosen) >= target:
      break
    cp = background[int(i)]
    s = script_of(cp)
    if script_count[s] < 2 or any(word_count[w] < 2 for w in words[cp]):
      continue
    chosen.add(cp)
    script_count[s] -= 1
    for w in words[cp]:
      word_count[w] -= 1
  return chosen


@dataclasses.dataclass
class GlyphsPlan:
  """The rendered dataset: examples per split plus the metadata written next to it."""

  examples: dict[str, list[tuple[int, str, np.ndarray]]]  # split -> [(codepoint, font, image)]
  metadata: dict[str, Any]


def _default_roles(chars: list[int], valid: dict[int, list[str]], fonts: list[str],
                   options: GlyphsOptions, rng: np.random.Generator) -> dict[int, str]:
  """The split of the characters of matplotlib's fonts (the default build's split).

  `valid[cp]`: the matplotlib fonts with a valid rendering of `cp`. Held-out fonts are the
  default ones, so the split does not depend on `options.held_out_fonts`.
  """
  source = [f for f in fonts if not matches(f, DEFAULT_HELD_OUT_FONTS)]
  chars = [cp for cp in chars if len(valid[cp]) >= options.min_fonts
           and sum(f in source for f in valid[cp]) >= 3]
  held_scripts = set(options.test_scripts)
  background = [cp for cp in chars if script_of(cp) not in held_scripts]
  cls_chars = _pick_test_classes(
      background, int(round(options.test_class_fraction * len(background))), rng)
  # val_classes: picked after test_classes from the rest, under the same rule (every name
  # word and script still in train), so test_classes is the same with or without it.
  rest = [cp for cp in background if cp not in cls_chars]
  val_chars = _pick_test_classes(
      rest, int(round(options.val_class_fraction * len(background))), rng)
  roles = {cp: "test_scripts" for cp in chars if script_of(cp) in held_scripts}
  roles.update({cp: ("test_classes" if cp in cls_chars else
                     "val_classes" if cp in val_chars else "train") for cp in background})
  return roles


def new_char_role(cp: int, options: GlyphsOptions, train_words: set[str],
                  train_scripts: set[str]) -> str:
  """Split of a character that only added fonts cover: by script, else by code-point hash
  (below test_class_fraction: test_classes; the next val_class_fraction: val_classes)."""
  script = script_of(cp)
  if script in set(options.test_scripts):
    return "test_scripts"
  h = split_hash(cp, options.seed)
  if (h < options.test_class_fraction + options.val_class_fraction and script in train_scripts
      and set(char_text(cp).split()) <= train_words):
    return "test_classes" if h < options.test_class_fraction else "val_classes"
  return "train"


def _check_held_out(patterns: tuple[str, ...], listed: list[FontFile]) -> None:
  """Every non-default held-out entry must match a font (a typo would hold out nothing)."""
  for pattern in patterns:
    one = held_out_matcher([pattern])
    if pattern not in DEFAULT_HELD_OUT_FONTS and not any(one(f) for f in listed):
      raise GlyphsError(f"held-out font {pattern!r} matches no font (fonts: "
                        f"{', '.join(f.name for f in listed)}); pass a font name pattern, a "
                        "family name or a --font_dir directory")


def _usable_fonts(listed: list[FontFile], excluded: dict[str, str]
                  ) -> tuple[list[FontFile], dict[str, dict[int, str]]]:
  """The fonts with a real Unicode cmap and their cmaps; the others go to `excluded`."""
  fonts = []
  for f in listed:
    if matches(f.name, FALLBACK_FONTS):
      excluded[f.name] = "fallback font"
    elif matches(f.name, SYMBOL_FONTS):
      excluded[f.name] = "known symbol font (cmap maps ASCII to other symbols)"
    else:
      fonts.append(f)
  cmaps = {}
  for f in fonts:
    cm = read_cmap(f.path)
    if len(cm) > FALLBACK_CMAP_SIZE:
      excluded[f.name] = f"fallback font (maps {len(cm)} codepoints)"
    elif not cm:
      excluded[f.name] = "no readable Unicode cmap"
    else:
      cmaps[f.name] = cm
  return [f for f in fonts if f.name in cmaps], cmaps


@dataclasses.dataclass
class _Candidates:
  """The characters of a build before rendering."""

  coverage: dict[int, list[str]]  # codepoint -> fonts whose cmap has a glyph for it
  base_cov: dict[int, list[str]]  # the same, matplotlib's fonts only
  chars: list[int]  # matplotlib's characters (subsampled on reduced builds)
  new_chars: list[int]  # characters only the added training fonts bring to min_fonts
  to_render: list[int]  # chars, new_chars and the probes


def _candidates(fonts: list[FontFile], cmaps, base: set[str], held_names: set[str],
                options: GlyphsOptions) -> _Candidates:
  """The characters to render: matplotlib's, those the added fonts bring, and the probes."""
  coverage: dict[int, list[str]] = {}
  for f in fonts:
    for cp, glyph in cmaps[f.name].items():
      if glyph != ".notdef" and is_candidate_char(cp):
        coverage.setdefault(cp, []).append(f.name)
  base_cov = {cp: [f for f in fs if f in base] for cp, fs in coverage.items()}
  base_candidates = sorted(cp for cp, fs in base_cov.items() if len(fs) >= options.min_fonts)
  chars = base_candidates
  if options.max_chars is not None:
    chars = _subsample_chars(chars, int(options.max_chars), options.seed)
  # Characters that added training fonts bring to min_fonts (held-out fonts bring none: they
  # add test domains only), sampled at the same rate as the others on reduced builds.
  known = set(base_candidates)
  rate = 1.0 if options.max_chars is None else len(chars) / max(len(base_candidates), 1)
  new_chars = sorted(cp for cp, fs in coverage.items() if cp not in known
                     and sum(f not in held_names for f in fs) >= options.min_fonts
                     and split_hash(cp, options.seed + 1) < rate)
  # Probes (printable ASCII and Latin-1) judge whole fonts even on a reduced build.
  probes = [cp for cp in list(range(0x21, 0x7F)) + list(range(0xA1, 0x100)) if cp in coverage]
  to_render = sorted(set(chars) | set(new_chars) | set(probes))
  return _Candidates(coverage, base_cov, chars, new_chars, to_render)


def _render(fonts: list[FontFile], cand: _Candidates,
            image_size: int) -> dict[tuple[int, str], np.ndarray]:
  """(codepoint, font) -> (S, S) uint8 image, for every valid rendering."""
  renderers = {f.name: GlyphRenderer(f.path, image_size) for f in fonts}
  images: dict[tuple[int, str], np.ndarray] = {}
  for cp in cand.to_render:
    for fname in cand.coverage[cp]:
      img = renderers[fname].render(chr(cp))
      if img is not None:
        images[cp, fname] = img
  return images


def _drop_disagreeing(fonts: list[FontFile], base_names: list[str], added: list[str],
                      cand: _Candidates, images, cmaps, excluded: dict[str, str]) -> None:
  """Adds to `excluded` the fonts whose renderings disagree with the other fonts' (they map
  codepoints to other glyphs). matplotlib's fonts are judged among themselves (so the default
  split never depends on the added fonts), added fonts against all."""
  base_render = [cp for cp in cand.to_render if cand.base_cov.get(cp)]
  excluded.update(disagreeing_fonts(base_render, base_names, images, cmaps))
  if added:
    ok_names = [f.name for f in fonts if f.name not in excluded]
    excluded.update(disagreeing_fonts(cand.to_render, ok_names, images, cmaps, judge=added))


def _character_roles(cand: _Candidates, base_ok: list[str], images, options: GlyphsOptions,
                     rng: np.random.Generator) -> dict[int, str]:
  """codepoint -> "train" / "val_classes" / "test_classes" / "test_scripts": the default
  build's split for matplotlib's characters (from matplotlib's fonts alone), a per-character rule for others."""
  base_valid = {cp: [f for f in base_ok if (cp, f) in images] for cp in cand.chars}
  role = _default_roles(cand.chars, base_valid, base_ok, options, rng)
  train_words = {w for cp, r in role.items() if r == "train" for w in char_text(cp).split()}
  train_scripts = {script_of(cp) for cp, r in role.items() if r == "train"}
  for cp in cand.new_chars:
    role[cp] = new_char_role(cp, options, train_words, train_scripts)
  return role


def _split_pairs(role: dict[int, str], valid: dict[int, list[str]], source: list[str],
                 held: list[str], options: GlyphsOptions, rng: np.random.Generator,
                 ) -> tuple[dict[str, list[tuple[int, str]]], list[int], list[int]]:
  """The (codepoint, font) pairs of every split, the train and the test_scripts characters."""
  chars = sorted(cp for cp in role if len(valid[cp]) >= options.min_fonts
                 and sum(f in source for f in valid[cp]) >= 3)
  scr_chars = [cp for cp in chars if role[cp] == "test_scripts"]
  cls_chars = {cp for cp in chars if role[cp] == "test_classes"}
  val_chars = sorted(cp for cp in chars if role[cp] == "val_classes")
  train_chars = [cp for cp in chars if role[cp] == "train"]

  def src_fonts(cp: int) -> list[str]:
    return [f for f in valid[cp] if f in source]

  def held_fonts(cp: int) -> list[str]:
    return [f for f in valid[cp] if f in held]

  n_train_ex = sum(len(src_fonts(cp)) for cp in train_chars)
  eligible = [cp for cp in train_chars if len(src_fonts(cp)) >= 4]
  n_val = min(len(eligible), int(round(options.val_fraction * n_train_ex)))
  val_pairs = set()
  for i in sorted(rng.permutation(len(eligible))[:n_val]):
    cp = eligible[int(i)]
    fs = src_fonts(cp)
    val_pairs.add((cp, fs[int(rng.integers(len(fs)))]))

  pairs: dict[str, list[tuple[int, str]]] = {s: [] for s in SPLITS}
  for cp in train_chars:
    for f in src_fonts(cp):
      pairs["val" if (cp, f) in val_pairs else "train"].append((cp, f))
    pairs["test_fonts"] += [(cp, f) for f in held_fonts(cp)]
  for split, split_chars in (("test_classes", sorted(cls_chars)), ("test_scripts", scr_chars)):
    for cp in split_chars:
      pairs[split] += [(cp, f) for f in src_fonts(cp)]
      pairs["test_both"] += [(cp, f) for f in held_fonts(cp)]
  # Selection characters in the source fonts only: their held-out-font renderings are used
  # nowhere, so no held-out font is looked at before testing.
  for cp in val_chars:
    pairs["val_classes"] += [(cp, f) for f in src_fonts(cp)]
  return pairs, train_chars, scr_chars


def _metadata(options: GlyphsOptions, pairs, train_chars: list[int], scr_chars: list[int],
              font_names: list[str], source: list[str], held: list[str], added: list[str],
              excluded: dict[str, str]) -> dict[str, Any]:
  """The metadata written next to the dataset: fonts, scripts and per split its classes."""
  split_meta = {}
  for s in SPLITS:
    cps = train_chars if s in TRAIN_LABEL_SPLITS else sorted({cp for cp, _ in pairs[s]})
    split_meta[s] = {
        "class_names": [char_text(cp) for cp in cps],
        "codepoints": cps,
        "scripts": [script_of(cp) for cp in cps],
        "fonts": sorted({f for _, f in pairs[s]}),
        "num_examples": len(pairs[s]),
        "num_classes": len({cp for cp, _ in pairs[s]}),
    }
  return {
      "version": VERSION,
      "options": dataclasses.asdict(options),
      "fonts": font_names,  # the `domain` feature indexes this list
      "source_fonts": source,
      "held_out_fonts": held,
      "excluded_fonts": dict(sorted(excluded.items())),
      "added_fonts": [f for f in added if f in font_names],  # from font_dirs
      # A character's split depends on the character only (see the package docstring).
      "character_split": "matplotlib fonts' default split; added characters by code point",
      "train_scripts": sorted({script_of(cp) for cp in train_chars}),
      "test_scripts": sorted({script_of(cp) for cp in scr_chars}),
      "splits": split_meta,
  }


def build_plan(options: GlyphsOptions = GlyphsOptions()) -> GlyphsPlan:
  """Reads the fonts, renders every candidate (character, font), filters and splits.

  Returns the examples of every split (images (S, S) uint8) and the metadata: per split
  the class names in label order, codepoints, scripts and fonts.
  """
  t0 = time.perf_counter()
  mpl_dir = os.path.join(os.path.abspath(matplotlib_font_dir()), "")
  listed = list_fonts(options.font_dirs)
  is_held = held_out_matcher(options.held_out_fonts)
  _check_held_out(options.held_out_fonts, listed)
  excluded: dict[str, str] = {}
  fonts, cmaps = _usable_fonts(listed, excluded)
  base = {f.name for f in fonts if os.path.abspath(f.path).startswith(mpl_dir)}
  added = [f.name for f in fonts if f.name not in base]
  cand = _candidates(fonts, cmaps, base, {f.name for f in fonts if is_held(f)}, options)
  log.info("glyphs: %d fonts (%d added), %d characters to render", len(fonts), len(added),
           len(cand.to_render))
  images = _render(fonts, cand, options.image_size)
  log.info("glyphs: %d renderings in %.1f s", len(images), time.perf_counter() - t0)

  base_names = sorted(base)
  _drop_disagreeing(fonts, base_names, added, cand, images, cmaps, excluded)
  fonts = [f for f in fonts if f.name not in excluded]
  font_names = [f.name for f in fonts]
  held = [f.name for f in fonts if is_held(f)]
  source = [f for f in font_names if f not in held]
  if not source:
    raise GlyphsError("glyphs: every font is held out; hold out fewer fonts")

  rng = np.random.default_rng(options.seed)
  role = _character_roles(cand, [f for f in base_names if f not in excluded], images, options, rng)
  valid = {cp: [f for f in font_names if (cp, f) in images] for cp in role}
  pairs, train_chars, scr_chars = _split_pairs(role, valid, source, held, options, rng)
  examples = {s: [(cp, f, images[cp, f]) for cp, f in pairs[s]] for s in SPLITS}
  metadata = _metadata(options, pairs, train_chars, scr_chars, font_names, source, held,
                       added, excluded)
  return GlyphsPlan(examples=examples, metadata=metadata)
