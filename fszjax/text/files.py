"""Tokenizer files: where a config's tokenizer path points, and the copy a workdir carries."""

from __future__ import annotations

import os

from fszjax.text.base import TokenizerError, atomic_write
from fszjax.text.sentencepiece import Tokenizer


def resolve_path(path: str | None, base_dir: str | None) -> str | None:
  """A tokenizer path as stored in a config: absolute, or relative to the config's directory;
  when an absolute path moved with its directory, the copy under base_dir/tokenizer/ is used."""
  if not path:
    return path
  if os.path.isabs(path):
    if os.path.exists(path) or not base_dir:
      return path
    moved = os.path.join(base_dir, "tokenizer", os.path.basename(path))
    return moved if os.path.exists(moved) else path
  return os.path.join(base_dir, path) if base_dir else path


WORKDIR_SUBDIR = "tokenizer"


def copy_to_workdir(tok, workdir: str) -> str:
  """Writes the file of tokenizer `tok` (any tokenizer with ``save(path)``: SentencePiece,
  CLIP BPE, big_vision) into ``workdir/tokenizer/`` so that the workdir carries what it
  needs to encode text. Returns the absolute path of the copy.

  The file keeps its name (``spm.model`` for a tokenizer never saved). An existing copy
  with other contents is an error: the run in that workdir was trained with another
  tokenizer."""
  src = getattr(tok, "path", None)
  name = os.path.basename(src) if src else ("spm.model" if isinstance(tok, Tokenizer) else "tokenizer.model")
  dst = os.path.join(os.path.abspath(workdir), WORKDIR_SUBDIR, name)
  if os.path.exists(dst):
    new = _bytes_of(tok)
    with open(dst, "rb") as f:
      old = f.read()
    if new is not None and old != new:
      raise TokenizerError(
          f"{dst} (the tokenizer this workdir was trained with) differs from the tokenizer of "
          f"config.data ({src or 'trained from the data'}); resume with the original data config "
          "or pass a new --workdir")
    return dst
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  if src and os.path.isfile(src):
    with open(src, "rb") as f:
      atomic_write(dst, f.read())
  else:
    saved_path = getattr(tok, "path", None)
    tok.save(dst)
    if hasattr(tok, "path"):
      tok.path = saved_path  # `save` repoints the object; the caller's tokenizer is unchanged
  return dst


def _bytes_of(tok) -> bytes | None:
  if hasattr(tok, "model_proto"):
    return bytes(tok.model_proto)
  src = getattr(tok, "path", None)
  if src and os.path.isfile(src):
    with open(src, "rb") as f:
      return f.read()
  return None
