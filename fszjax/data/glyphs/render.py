"""Glyphs rendering: one font's characters drawn to centred, size-normalised (S, S) images."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fszjax.data.glyphs.options import DEFAULT_IMAGE_SIZE


class GlyphRenderer:
  """Renders characters of one font to (S, S) uint8 images.

  The font is drawn at 4x supersampling with an em of `em_frac * S` pixels (size
  normalised per font: relative glyph sizes within a font are kept, so "." stays small),
  the ink box is centred, glyphs larger than the margin box are shrunk to fit, and the
  result is box-filtered down to S x S.
  """

  def __init__(self, path: str, image_size: int = DEFAULT_IMAGE_SIZE, em_frac: float = 0.75,
               margin: int = 1, supersample: int = 4):
    self.size = int(image_size)
    self.ss = int(supersample)
    self.margin = int(margin)
    px = max(4, int(round(em_frac * self.size * self.ss)))
    self.font = ImageFont.truetype(path, px, layout_engine=ImageFont.Layout.BASIC)
    self._notdef = self._ink(chr(0x10FFFF))  # what this font draws for a missing glyph

  def _ink(self, ch: str) -> np.ndarray | None:
    """High-resolution ink crop (h, w) uint8, or None when nothing is drawn."""
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
