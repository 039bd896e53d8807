"""What every tokenizer shares: the error type, text normalisation, atomic file writes."""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

from fszjax.errors import UserError


class TokenizerError(UserError):
  """Bad tokenizer settings or model file; the message names the fix."""


def as_texts(texts: str | bytes | Sequence[str | bytes]) -> list[str]:
  """A text or a sequence of texts -> list of str (bytes are decoded as UTF-8)."""
  if isinstance(texts, (str, bytes)):
    texts = [texts]
  return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]


def atomic_write(path: str, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file in the same directory (no partial file)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
