"""Glyphs characters: coarse scripts, class texts, candidate codepoints, stable hashes."""

from __future__ import annotations

import hashlib
import unicodedata

_SKIP_CATEGORIES = {"Zs", "Zl", "Zp", "Cc", "Cf", "Co", "Cn", "Cs", "Mn", "Me"}

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



def split_hash(cp: int, seed: int) -> float:
  """A number in [0, 1) that depends on the code point (and seed) only."""
  h = hashlib.sha256(f"glyphs-split/{seed}/{cp}".encode()).digest()
  return int.from_bytes(h[:8], "little") / 2.0**64


def case_partners(cp: int) -> list[int]:
  """The other-case forms of a letter (single code points), e.g. "a" -> ["A"]."""
  ch = chr(cp)
  out = []
  for other in (ch.upper(), ch.lower(), ch.title()):
    if len(other) == 1 and ord(other) != cp and ord(other) not in out:
      out.append(ord(other))
  return out
