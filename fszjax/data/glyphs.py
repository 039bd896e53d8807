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
  test_classes  characters never in train, from scripts train covers, every word of their
                names occurring in train names (compositional zero-shot)
  test_scripts  whole scripts never in train (armenian, georgian, braille, lao): few-shot
                transfer to new alphabets
  test_fonts    train characters in held-out fonts (domain shift)
  test_both     held-out characters in held-out fonts

Stable character split: a character's split (train / test_classes / test_scripts) depends
on the character only, never on the fonts added. Characters that matplotlib's fonts cover
keep the split the default build gives them (computed from matplotlib's fonts alone, with
the default held-out fonts); characters only the added fonts cover go to test_scripts by
script, else to test_classes by a hash of their code point (when every word of their name
is a train word), else to train. The default build is unchanged by this rule. Adding fonts
or holding out other fonts therefore never turns a held-out character of an existing
model into a training class: it adds examples (and new characters) only.

Held-out fonts (`held_out_fonts`): fnmatch patterns of font names (file stems, e.g.
"STIX*"), of family names (from the font's name table, e.g. "Roboto Slab"), or
directories (every font under one, e.g. a whole `--font_dir`). Held-out fonts give only
test_fonts / test_both examples.

Labels: train, val and test_fonts share the train label space; every other split has its
own (0..K-1, codepoint order). `metadata.json` in the dataset directory holds, per split,
the class names in label order (see `read_metadata`).

Everything is deterministic: same fonts and options -> same dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import glob
import hashlib
import io
import json
import logging
import os
import time
import unicodedata
from typing import Any, Iterable, Sequence

import numpy as np

from fszjax.errors import UserError

log = logging.getLogger(__name__)


class GlyphsError(UserError):
  """A Glyphs build cannot be made as asked; the message names the fix."""

VERSION = "1.0.0"
_VERSION = VERSION
NAME = "glyphs"
SPLITS = ("train", "val", "test_classes", "test_scripts", "test_fonts", "test_both")
# Splits whose labels index the train class list.
TRAIN_LABEL_SPLITS = ("train", "val", "test_fonts")

DEFAULT_IMAGE_SIZE = 32
DEFAULT_HELD_OUT_FONTS = ("STIX*", "cm*")
DEFAULT_TEST_SCRIPTS = ("armenian", "georgian", "braille", "lao")
# Fallback fonts draw a placeholder for every codepoint: never real glyphs.
FALLBACK_FONTS = ("LastResort*",)
# TeX math fonts whose cmap maps ASCII codepoints to unrelated symbols. The agreement
# check below finds them anyway; the list makes the exclusion explicit.
SYMBOL_FONTS = ("cmex10", "cmsy10", "cmmi10")
_SKIP_CATEGORIES = {"Zs", "Zl", "Zp", "Cc", "Cf", "Co", "Cn", "Cs", "Mn", "Me"}
_FALLBACK_CMAP_SIZE = 60_000

# Script words that may open (or appear in) a Unicode character name.
_SCRIPT_WORDS = (
    "latin", "greek", "cyrillic", "armenian", "georgian", "hebrew", "arabic", "syriac",
    "thaana", "nko", "devanagari", "bengali", "gurmukhi", "gujarati", "oriya", "tamil",
    "telugu", "kannada", "malayalam", "sinhala", "thai", "lao", "tibetan", "myanmar",
    "ethiopic", "cherokee", "canadian", "ogham", "runic", "tagalog", "khmer", "mongolian",
    "limbu", "buginese", "balinese", "sundanese", "lepcha", "glagolitic", "coptic",
    "tifinagh", "lisu", "vai", "bamum", "hangul", "hiragana", "katakana", "bopomofo",
    "cjk", "yi", "braille",
)


# ----------------------------------------------------------------------------- scripts


def script_of(cp: int) -> str:
  """Coarse script / symbol family of a codepoint, from its Unicode name and block.

  Letters, digits and punctuation named after a script get that script ("latin",
  "greek", "armenian", ...); other symbols get their family ("arrows", "box drawing",
  "block elements", "geometric shapes", "math", "currency", "numbers", "punctuation",
  "modifier letters", "letterlike", "technical", "symbols").
  """
  ch = chr(cp)
  name = unicodedata.name(ch, "")
  cat = unicodedata.category(ch)
  words = name.lower().split()
  if cat[0] in "LNMP" or "braille" in words:
    for w in words:
      if w in _SCRIPT_WORDS:
        return "canadian syllabics" if w == "canadian" else w
  if name.startswith("BOX DRAWINGS"):
    return "box drawing"
  if 0x2580 <= cp <= 0x259F:
    return "block elements"
  if any(w.startswith("arrow") or w.endswith("arrow") or w.endswith("arrows") for w in words):
    return "arrows"
  if 0x25A0 <= cp <= 0x25FF:
    return "geometric shapes"
  if cat == "Sm" or any(a <= cp <= b for a, b in (
      (0x2200, 0x22FF), (0x2A00, 0x2AFF), (0x27C0, 0x27EF), (0x2980, 0x29FF),
      (0x1D400, 0x1D7FF))):
    return "math"
  if cat == "Sc":
    return "currency"
  if cat[0] == "N":
    return "numbers"
  if cat[0] == "P":
    return "punctuation"
  if cat in ("Lm", "Sk"):
    return "modifier letters"
  if 0x2100 <= cp <= 0x214F:
    return "letterlike"
  if 0x2300 <= cp <= 0x23FF:
    return "technical"
  if cat[0] == "L":
    return "other letters"
  return "symbols"


def char_text(cp: int) -> str:
  """The class text of a codepoint: its Unicode name, lowercased."""
  return unicodedata.name(chr(cp)).lower()


def is_candidate_char(cp: int) -> bool:
  """Named, visible characters (no spaces, controls, private use or combining marks)."""
  ch = chr(cp)
  return bool(unicodedata.name(ch, "")) and unicodedata.category(ch) not in _SKIP_CATEGORIES


# ----------------------------------------------------------------------------- fonts


def matplotlib_font_dir() -> str:
  """The directory of TrueType fonts shipped inside matplotlib's wheel."""
  import matplotlib  # noqa: PLC0415

  return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


@dataclasses.dataclass(frozen=True)
class FontFile:
  name: str  # the domain name: the file stem, e.g. "DejaVuSans-Bold"
  path: str


def list_fonts(font_dirs: Sequence[str] = (), include_matplotlib: bool = True) -> list[FontFile]:
  """Font files (.ttf/.otf) of matplotlib and `font_dirs` (searched recursively).

  Fonts are named by file stem; a later file with an already-used stem is skipped
  (the same font installed twice must not become two domains). Sorted by name.
  """
  dirs = ([matplotlib_font_dir()] if include_matplotlib else []) + list(font_dirs)
  seen: dict[str, FontFile] = {}
  for d in dirs:
    if not os.path.isdir(d):
      raise FileNotFoundError(f"font directory {d!r} does not exist; pass an existing --font_dir")
    paths = []
    for ext in ("ttf", "otf", "TTF", "OTF"):
      paths += glob.glob(os.path.join(d, "**", f"*.{ext}"), recursive=True)
    for p in sorted(set(paths)):
      stem = os.path.splitext(os.path.basename(p))[0]
      if stem in seen:
        log.info("glyphs: skipping %s (font %s already found at %s)", p, stem, seen[stem].path)
        continue
      seen[stem] = FontFile(stem, p)
  return [seen[k] for k in sorted(seen)]


def _matches(name: str, patterns: Iterable[str]) -> bool:
  return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def read_cmap(path: str) -> dict[int, str]:
  """codepoint -> glyph name of a font's best Unicode cmap (empty if unreadable)."""
  from fontTools.ttLib import TTFont  # noqa: PLC0415

  logging.getLogger("fontTools").setLevel(logging.ERROR)
  try:
    with TTFont(path, lazy=True, fontNumber=0) as font:
      return dict(font.getBestCmap() or {})
  except Exception as e:  # noqa: BLE001  (a broken font file is skipped, not fatal)
    log.warning("glyphs: cannot read font %s (%s); skipped", path, e)
    return {}


# ----------------------------------------------------------------------------- rendering


class GlyphRenderer:
  """Renders characters of one font to (S, S) uint8 images.

  The font is drawn at 4x supersampling with an em of `em_frac * S` pixels (size
  normalised per font: relative glyph sizes within a font are kept, so "." stays small),
  the ink box is centred, glyphs larger than the margin box are shrunk to fit, and the
  result is box-filtered down to S x S.
  """

  def __init__(self, path: str, image_size: int = DEFAULT_IMAGE_SIZE, em_frac: float = 0.75,
               margin: int = 1, supersample: int = 4):
    from PIL import ImageFont  # noqa: PLC0415

    self.size = int(image_size)
    self.ss = int(supersample)
    self.margin = int(margin)
    px = max(4, int(round(em_frac * self.size * self.ss)))
    self.font = ImageFont.truetype(path, px, layout_engine=ImageFont.Layout.BASIC)
    self._notdef = self._ink(chr(0x10FFFF))  # what this font draws for a missing glyph

  def _ink(self, ch: str) -> np.ndarray | None:
    """High-resolution ink crop (h, w) uint8, or None when nothing is drawn."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    try:
      x0, y0, x1, y1 = self.font.getbbox(ch)
    except Exception:  # noqa: BLE001
      return None
    w, h = max(x1 - x0, 1) + 4, max(y1 - y0, 1) + 4
    if w > 64 * self.size * self.ss or h > 64 * self.size * self.ss:
      return None
    im = Image.new("L", (w, h))
    ImageDraw.Draw(im).text((2 - x0, 2 - y0), ch, font=self.font, fill=255)
    a = np.asarray(im)
    ys, xs = np.nonzero(a)
    if ys.size == 0:
      return None
    return a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]

  def render(self, ch: str) -> np.ndarray | None:
    """(S, S) uint8 image of `ch`, or None for blank / .notdef renderings."""
    ink = self._ink(ch)
    if ink is None or int(ink.max()) < 128:
      return None
    if self._notdef is not None and ink.shape == self._notdef.shape and np.array_equal(ink, self._notdef):
      return None
    return self._normalise(ink)

  def notdef_image(self) -> np.ndarray | None:
    """(S, S) uint8 image of this font's .notdef glyph (what a missing character shows)."""
    return None if self._notdef is None else self._normalise(self._notdef)

  def _normalise(self, ink: np.ndarray) -> np.ndarray | None:
    from PIL import Image  # noqa: PLC0415

    h, w = ink.shape
    box = (self.size - 2 * self.margin) * self.ss
    scale = min(1.0, box / max(h, w)) / self.ss
    nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    small = np.asarray(Image.fromarray(ink).resize((nw, nh), Image.BOX))
    out = np.zeros((self.size, self.size), np.uint8)
    y, x = (self.size - nh) // 2, (self.size - nw) // 2
    out[y:y + nh, x:x + nw] = small
    if int(out.max()) < 64:
      return None
    return out


def _agreement_vectors(img: np.ndarray, s: int = 16) -> np.ndarray:
  """Scale-normalised, zero-mean, unit-norm (s*s,) vector of a glyph for comparisons."""
  from PIL import Image  # noqa: PLC0415

  ys, xs = np.nonzero(img)
  crop = img[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
  h, w = crop.shape
  k = (s - 2) / max(h, w)
  im = Image.fromarray(crop).resize((max(1, round(w * k)), max(1, round(h * k))), Image.BILINEAR)
  out = np.zeros((s, s), np.float32)
  y, x = (s - im.size[1]) // 2, (s - im.size[0]) // 2
  out[y:y + im.size[1], x:x + im.size[0]] = np.asarray(im, np.float32) / 255.0
  v = out.ravel() - out.mean()
  return v / (np.linalg.norm(v) + 1e-6)


def _consensus_agreement(vecs: np.ndarray) -> np.ndarray:
  """(n,) cosine of each row of `vecs` (n, d) with the median of the other rows."""
  n = vecs.shape[0]
  out = np.zeros((n,), np.float32)
  for i in range(n):
    m = np.median(np.delete(vecs, i, axis=0), axis=0)
    m = m - m.mean()
    out[i] = float(vecs[i] @ m) / (float(np.linalg.norm(m)) + 1e-6)
  return out


# ----------------------------------------------------------------------------- the plan


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
  val_fraction: float = 0.05
  seed: int = 0

  def __post_init__(self):
    if int(self.image_size) < 8:
      raise ValueError(f"glyphs image_size={self.image_size} is too small; use >= 8 (default 32)")
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


def _pick_test_classes(background: list[int], fraction: float, rng: np.random.Generator) -> set[int]:
  """Held-out characters whose every name word (and script) stays in the remaining train set.

  Greedy over a seeded permutation: a character moves to the test set only if each of its
  words (and its script) is still carried by at least one other train character.
  """
  target = int(round(fraction * len(background)))
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


def read_family(path: str) -> str:
  """The font's family name (name table: typographic family, else family), or ""."""
  from fontTools.ttLib import TTFont  # noqa: PLC0415

  try:
    with TTFont(path, lazy=True, fontNumber=0) as font:
      table = font["name"]
      for name_id in (16, 1):
        rec = table.getDebugName(name_id)
        if rec:
          return str(rec)
  except Exception:  # noqa: BLE001  (an unreadable name table: no family)
    pass
  return ""


def held_out_matcher(patterns: Sequence[str]):
  """``match(FontFile) -> bool`` for `held_out_fonts` entries: a directory holds out every
  font under it; any other entry is an fnmatch pattern of the font's name or family."""
  dirs = [os.path.join(os.path.abspath(p), "") for p in patterns if os.path.isdir(p)]
  globs = [p for p in patterns if not os.path.isdir(p)]
  families: dict[str, str] = {}

  def match(f: FontFile) -> bool:
    if any(os.path.abspath(f.path).startswith(d) for d in dirs):
      return True
    if _matches(f.name, globs):
      return True
    if f.path not in families:
      families[f.path] = read_family(f.path)
    return bool(families[f.path]) and _matches(families[f.path], globs)

  return match


def split_hash(cp: int, seed: int) -> float:
  """A number in [0, 1) that depends on the code point (and seed) only."""
  h = hashlib.sha256(f"glyphs-split/{seed}/{cp}".encode()).digest()
  return int.from_bytes(h[:8], "little") / 2.0**64


def _case_partners(cp: int) -> list[int]:
  """The other-case forms of a letter (single code points), e.g. "a" -> ["A"]."""
  ch = chr(cp)
  out = []
  for other in (ch.upper(), ch.lower(), ch.title()):
    if len(other) == 1 and ord(other) != cp and ord(other) not in out:
      out.append(ord(other))
  return out


def _disagreeing_fonts(cps: Iterable[int], fonts: Sequence[str], images, cmaps,
                       judge: Sequence[str] | None = None) -> dict[str, str]:
  """Fonts whose renderings mostly disagree with the other fonts' (a wrong cmap).

  For each code point drawn by >= 3 of `fonts`, each rendering is compared with the median
  of the others. Tolerated (stylistic designs, not a wrong cmap): a rendering where the
  font does not claim a distinct glyph (its cmap maps the code point to the same glyph as
  another code point, e.g. a unicase or small-caps font drawing "a" with the "A" glyph),
  and a rendering that agrees with the other fonts' drawing of the same letter in the other
  case (small caps). A font is excluded when >= 5 and > 10% of its checked renderings
  disagree. Only fonts in `judge` (default all) are judged.
  """
  judge = set(fonts if judge is None else judge)
  font_set = set(fonts)
  shared: dict[str, set[int]] = {}
  for f in judge:
    by_glyph: dict[str, list[int]] = {}
    for cp, g in cmaps[f].items():
      by_glyph.setdefault(g, []).append(cp)
    shared[f] = {cp for cps_ in by_glyph.values() if len(cps_) > 1 for cp in cps_}
  cps = sorted(set(cps))
  vec_cache: dict[tuple[int, str], np.ndarray] = {}

  def vec(cp, f):
    if (cp, f) not in vec_cache:
      vec_cache[cp, f] = _agreement_vectors(images[cp, f])
    return vec_cache[cp, f]

  def drawn_by(cp):
    return [f for f in fonts if (cp, f) in images]

  bad_count: dict[str, int] = {}
  checked: dict[str, int] = {}
  for cp in cps:
    fs = drawn_by(cp)
    if len(fs) < 3 or not judge.intersection(fs):
      continue
    agree = _consensus_agreement(np.stack([vec(cp, f) for f in fs]))
    for f, a in zip(fs, agree):
      if f not in judge or cp in shared[f]:
        continue
      checked[f] = checked.get(f, 0) + 1
      if a >= 0.3:
        continue
      stylistic = False
      for other in _case_partners(cp):
        ref = [g for g in drawn_by(other) if g != f and g in font_set]
        if len(ref) >= 2:
          m = np.median(np.stack([vec(other, g) for g in ref]), axis=0)
          m = m - m.mean()
          if float(vec(cp, f) @ m) / (float(np.linalg.norm(m)) + 1e-6) >= 0.5:
            stylistic = True
            break
      bad_count[f] = bad_count.get(f, 0) + int(not stylistic)
  out = {}
  for f in sorted(judge):
    n, bad = checked.get(f, 0), bad_count.get(f, 0)
    if bad >= 5 and bad > 0.1 * n:
      out[f] = f"{bad}/{n} renderings disagree with the other fonts (wrong cmap)"
  return out


def _default_roles(chars: list[int], valid: dict[int, list[str]], fonts: list[str],
                   options: GlyphsOptions, rng: np.random.Generator) -> dict[int, str]:
  """The split of the characters of matplotlib's fonts (the default build's split).

  `valid[cp]`: the matplotlib fonts with a valid rendering of `cp`. Held-out fonts are the
  default ones, so the split does not depend on `options.held_out_fonts`.
  """
  source = [f for f in fonts if not _matches(f, DEFAULT_HELD_OUT_FONTS)]
  chars = [cp for cp in chars if len(valid[cp]) >= options.min_fonts
           and sum(f in source for f in valid[cp]) >= 3]
  held_scripts = set(options.test_scripts)
  background = [cp for cp in chars if script_of(cp) not in held_scripts]
  cls_chars = _pick_test_classes(background, options.test_class_fraction, rng)
  roles = {cp: "test_scripts" for cp in chars if script_of(cp) in held_scripts}
  roles.update({cp: ("test_classes" if cp in cls_chars else "train") for cp in background})
  return roles


def _new_char_role(cp: int, options: GlyphsOptions, train_words: set[str],
                   train_scripts: set[str]) -> str:
  """Split of a character that only added fonts cover: by script, else by code-point hash."""
  script = script_of(cp)
  if script in set(options.test_scripts):
    return "test_scripts"
  if (split_hash(cp, options.seed) < options.test_class_fraction and script in train_scripts
      and set(char_text(cp).split()) <= train_words):
    return "test_classes"
  return "train"


def build_plan(options: GlyphsOptions = GlyphsOptions()) -> GlyphsPlan:
  """Reads the fonts, renders every candidate (character, font), filters and splits.

  Returns the examples of every split (images (S, S) uint8) and the metadata: per split
  the class names in label order, codepoints, scripts and fonts.
  """
  t0 = time.perf_counter()
  mpl_dir = os.path.join(os.path.abspath(matplotlib_font_dir()), "")
  listed = list_fonts(options.font_dirs)
  is_held = held_out_matcher(options.held_out_fonts)
  for pattern in options.held_out_fonts:
    one = held_out_matcher([pattern])
    if pattern not in DEFAULT_HELD_OUT_FONTS and not any(one(f) for f in listed):
      raise GlyphsError(f"held-out font {pattern!r} matches no font (fonts: "
                        f"{', '.join(f.name for f in listed)}); pass a font name pattern, a "
                        "family name or a --font_dir directory")
  excluded: dict[str, str] = {}
  fonts = []
  for f in listed:
    if _matches(f.name, FALLBACK_FONTS):
      excluded[f.name] = "fallback font"
    elif _matches(f.name, SYMBOL_FONTS):
      excluded[f.name] = "known symbol font (cmap maps ASCII to other symbols)"
    else:
      fonts.append(f)
  cmaps = {}
  for f in fonts:
    cm = read_cmap(f.path)
    if len(cm) > _FALLBACK_CMAP_SIZE:
      excluded[f.name] = f"fallback font (maps {len(cm)} codepoints)"
    elif not cm:
      excluded[f.name] = "no readable Unicode cmap"
    else:
      cmaps[f.name] = cm
  fonts = [f for f in fonts if f.name in cmaps]
  base = {f.name for f in fonts if os.path.abspath(f.path).startswith(mpl_dir)}
  added = [f.name for f in fonts if f.name not in base]
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
  held_names = {f.name for f in fonts if is_held(f)}
  new_chars = sorted(cp for cp, fs in coverage.items() if cp not in known
                     and sum(f not in held_names for f in fs) >= options.min_fonts
                     and split_hash(cp, options.seed + 1) < rate)
  # Probes (printable ASCII and Latin-1) judge whole fonts even on a reduced build.
  probes = [cp for cp in list(range(0x21, 0x7F)) + list(range(0xA1, 0x100)) if cp in coverage]
  to_render = sorted(set(chars) | set(new_chars) | set(probes))
  log.info("glyphs: %d fonts (%d added), %d characters to render", len(fonts), len(added),
           len(to_render))

  renderers = {f.name: GlyphRenderer(f.path, options.image_size) for f in fonts}
  images: dict[tuple[int, str], np.ndarray] = {}
  for cp in to_render:
    for fname in coverage[cp]:
      img = renderers[fname].render(chr(cp))
      if img is not None:
        images[cp, fname] = img
  log.info("glyphs: %d renderings in %.1f s", len(images), time.perf_counter() - t0)

  # Fonts whose renderings disagree with the other fonts map codepoints to other glyphs.
  # matplotlib's fonts are judged among themselves (so the default split never depends on
  # the added fonts), added fonts against all.
  base_names = sorted(base)
  base_render = [cp for cp in to_render if base_cov.get(cp)]
  excluded.update(_disagreeing_fonts(base_render, base_names, images, cmaps))
  if added:
    ok_names = [f.name for f in fonts if f.name not in excluded]
    excluded.update(_disagreeing_fonts(to_render, ok_names, images, cmaps, judge=added))
  fonts = [f for f in fonts if f.name not in excluded]
  font_names = [f.name for f in fonts]
  held = [f.name for f in fonts if is_held(f)]
  source = [f for f in font_names if f not in held]
  if not source:
    raise GlyphsError("glyphs: every font is held out; hold out fewer fonts")

  # The character split: the default build's for matplotlib's characters (from matplotlib's
  # fonts alone), a per-character rule for the others.
  base_ok = [f for f in base_names if f not in excluded]
  base_valid = {cp: [f for f in base_ok if (cp, f) in images] for cp in chars}
  rng = np.random.default_rng(options.seed)
  role = _default_roles(chars, base_valid, base_ok, options, rng)
  train_words = {w for cp, r in role.items() if r == "train" for w in char_text(cp).split()}
  train_scripts = {script_of(cp) for cp, r in role.items() if r == "train"}
  for cp in new_chars:
    role[cp] = _new_char_role(cp, options, train_words, train_scripts)

  valid = {cp: [f for f in font_names if (cp, f) in images] for cp in role}
  chars = sorted(cp for cp in role if len(valid[cp]) >= options.min_fonts
                 and sum(f in source for f in valid[cp]) >= 3)
  script = {cp: script_of(cp) for cp in chars}
  scr_chars = [cp for cp in chars if role[cp] == "test_scripts"]
  cls_chars = {cp for cp in chars if role[cp] == "test_classes"}
  train_chars = [cp for cp in chars if role[cp] == "train"]

  def src_fonts(cp):
    return [f for f in valid[cp] if f in source]

  def held_fonts(cp):
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
  for cp in sorted(cls_chars):
    pairs["test_classes"] += [(cp, f) for f in src_fonts(cp)]
    pairs["test_both"] += [(cp, f) for f in held_fonts(cp)]
  for cp in scr_chars:
    pairs["test_scripts"] += [(cp, f) for f in src_fonts(cp)]
    pairs["test_both"] += [(cp, f) for f in held_fonts(cp)]

  split_meta = {}
  for s in SPLITS:
    if s in TRAIN_LABEL_SPLITS:
      cps = train_chars
    else:
      cps = sorted({cp for cp, _ in pairs[s]})
    split_meta[s] = {
        "class_names": [char_text(cp) for cp in cps],
        "codepoints": cps,
        "scripts": [script[cp] for cp in cps],
        "fonts": sorted({f for _, f in pairs[s]}),
        "num_examples": len(pairs[s]),
        "num_classes": len({cp for cp, _ in pairs[s]}),
    }
  examples = {s: [(cp, f, images[cp, f]) for cp, f in pairs[s]] for s in SPLITS}
  metadata = {
      "version": VERSION,
      "options": dataclasses.asdict(options),
      "fonts": font_names,  # the `domain` feature indexes this list
      "source_fonts": source,
      "held_out_fonts": held,
      "excluded_fonts": dict(sorted(excluded.items())),
      "added_fonts": [f for f in added if f in font_names],  # from font_dirs
      # A character's split depends on the character only (see the module docstring).
      "character_split": "matplotlib fonts' default split; added characters by code point",
      "train_scripts": sorted({script[cp] for cp in train_chars}),
      "test_scripts": sorted({script[cp] for cp in scr_chars}),
      "splits": split_meta,
  }
  return GlyphsPlan(examples=examples, metadata=metadata)


# ----------------------------------------------------------------------------- TFDS


def _png(img: np.ndarray) -> bytes:
  from PIL import Image  # noqa: PLC0415

  buf = io.BytesIO()
  Image.fromarray(img, mode="L").save(buf, format="PNG", optimize=False)
  return buf.getvalue()


def _make_builder_class():
  """Defines the TFDS builder lazily (importing TFDS registers it as "glyphs")."""
  import tensorflow_datasets as tfds  # noqa: PLC0415

  @dataclasses.dataclass(eq=False)
  class GlyphsConfig(tfds.core.BuilderConfig):
    """A Glyphs build; `options` holds everything that determines it."""

    options: GlyphsOptions = GlyphsOptions()

  class Glyphs(tfds.core.GeneratorBasedBuilder):
    """Characters x fonts rendered from real TrueType fonts (see `fszjax.data.glyphs`)."""

    VERSION = tfds.core.Version(_VERSION)
    RELEASE_NOTES = {_VERSION: "First release."}
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
  from etils import epath  # noqa: PLC0415

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
