"""Glyphs font agreement: fonts (and glyphs) whose renderings disagree with the other fonts'.

Fonts with legacy encodings (the TeX cm* fonts) map ASCII codepoints to other symbols; their
renderings disagree with every other font's drawing of the same codepoint.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from fszjax.data.glyphs import scripts


def agreement_vector(img: np.ndarray, s: int = 16) -> np.ndarray:
  """Scale-normalised, zero-mean, unit-norm (s*s,) vector of a glyph for comparisons."""
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


def consensus_agreement(vecs: np.ndarray) -> np.ndarray:
  """(n,) cosine of each row of `vecs` (n, d) with the median of the other rows."""
  n = vecs.shape[0]
  out = np.zeros((n,), np.float32)
  for i in range(n):
    m = np.median(np.delete(vecs, i, axis=0), axis=0)
    m = m - m.mean()
    out[i] = float(vecs[i] @ m) / (float(np.linalg.norm(m)) + 1e-6)
  return out


def disagreeing_fonts(cps: Iterable[int], fonts: Sequence[str], images, cmaps,
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
      vec_cache[cp, f] = agreement_vector(images[cp, f])
    return vec_cache[cp, f]

  def drawn_by(cp):
    return [f for f in fonts if (cp, f) in images]

  bad_count: dict[str, int] = {}
  checked: dict[str, int] = {}
  for cp in cps:
    fs = drawn_by(cp)
    if len(fs) < 3 or not judge.intersection(fs):
      continue
    agree = consensus_agreement(np.stack([vec(cp, f) for f in fs]))
    for f, a in zip(fs, agree):
      if f not in judge or cp in shared[f]:
        continue
      checked[f] = checked.get(f, 0) + 1
      if a >= 0.3:
        continue
      stylistic = False
      for other in scripts.case_partners(cp):
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
