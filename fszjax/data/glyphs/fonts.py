"""Glyphs fonts: finding font files, reading their cmaps and family names, held-out fonts."""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import importlib.util
import logging
import os
from typing import Iterable, Sequence

from fontTools.ttLib import TTFont

log = logging.getLogger(__name__)

# Fallback fonts draw a placeholder for every codepoint: never real glyphs.
FALLBACK_FONTS = ("LastResort*",)
# TeX math fonts whose cmap maps ASCII codepoints to unrelated symbols. The agreement
# check (`agreement.disagreeing_fonts`) finds them anyway; the list makes the exclusion explicit.
SYMBOL_FONTS = ("cmex10", "cmsy10", "cmmi10")
FALLBACK_CMAP_SIZE = 60_000


def matplotlib_font_dir() -> str:
  """The directory of TrueType fonts shipped inside matplotlib's wheel (found, not imported)."""
  spec = importlib.util.find_spec("matplotlib")
  return os.path.join(os.path.dirname(spec.origin), "mpl-data", "fonts", "ttf")


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


def matches(name: str, patterns: Iterable[str]) -> bool:
  """Whether `name` matches any of the fnmatch `patterns` (case-sensitive)."""
  return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def read_cmap(path: str) -> dict[int, str]:
  """codepoint -> glyph name of a font's best Unicode cmap (empty if unreadable)."""
  logging.getLogger("fontTools").setLevel(logging.ERROR)
  try:
    with TTFont(path, lazy=True, fontNumber=0) as font:
      return dict(font.getBestCmap() or {})
  except Exception as e:  # noqa: BLE001  (a broken font file is skipped, not fatal)
    log.warning("glyphs: cannot read font %s (%s); skipped", path, e)
    return {}


def read_family(path: str) -> str:
  """The font's family name (name table: typographic family, else family), or ""."""
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
    if matches(f.name, globs):
      return True
    if f.path not in families:
      families[f.path] = read_family(f.path)
    return bool(families[f.path]) and matches(families[f.path], globs)

  return match
