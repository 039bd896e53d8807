"""What every tokenizer shares: the error type, text normalisation, model files, decoding,
atomic file writes."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Sequence

import numpy as np

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


def read_model(path: str, build: Callable[[bytes], Any], error: type[UserError], missing: str,
               not_a_model: str, catch: type[BaseException] = Exception) -> Any:
  """`build(bytes of path)`, with one-line `error`s for a missing file (`missing`) or one
  `build` rejects with `catch` (`"<path> is not a SentencePiece model (...); " + not_a_model`)."""
  if not os.path.isfile(path):
    raise error(missing)
  with open(path, "rb") as f:
    proto = f.read()
  try:
    return build(proto)
  except catch as e:
    raise error(f"{path!r} is not a SentencePiece model ({e}); {not_a_model}") from None


def ids_until(row: Sequence[int], stop: int, skip: int) -> list[int]:
  """The ids of `row` before the first `stop`, without the `skip` ids."""
  out = []
  for t in row:
    if t == stop:
      break
    if t != skip:
      out.append(int(t))
  return out


def decode_batch(tokens, decode_row: Callable[[list[int]], str]) -> list[str]:
  """int (B, L) or (L,) tokens -> B strings (`decode_row` of each row's ids; B = 1 for 1-D)."""
  arr = np.asarray(tokens)
  texts = [decode_row(row.tolist()) for row in np.atleast_2d(arr)]
  return texts[:1] if arr.ndim == 1 else texts
