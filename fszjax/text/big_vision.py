"""A SentencePiece model tokenized the big_vision way (SigLIP's tokens): `BigVisionTokenizer`."""

from __future__ import annotations

import os
import string
from typing import Sequence

import numpy as np
import sentencepiece as spm

from fszjax.text.base import TokenizerError, as_texts, read_model

CLEAN = ("none", "lower", "canonicalize")


class TokenizerKindError(TokenizerError):
  """Unknown tokenizer kind or options; the message names the fix."""


def canonicalize(text: str) -> str:
  """big_vision's zero-shot text canonicalisation: '_' -> ' ', punctuation removed,
  lower-cased, whitespace collapsed."""
  text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation)).lower()
  return " ".join(text.split()).strip()


class BigVisionTokenizer:
  """A SentencePiece model tokenized as big_vision's ``tokenize`` op does for SigLIP.

  ``encode(texts, max_len) -> int32 (B, max_len)``: SentencePiece ids (no offset), then
  EOS (``eos`` in "yes"/"sticky"), padded with ``pad_value``; with "sticky" a too-long text
  keeps EOS in its last position. SigLIP used ``eos="sticky", pad_value=1`` (1 is EOS in
  the c4_en/mc4 models) and pools the text tower's last position. ``clean`` is applied
  first: "lower" (big_vision's ``lower=True`` default), "canonicalize" (its zero-shot
  prompt cleaning, also open_clip's SigLIP tokenizer setting) or "none".
  """

  def __init__(self, model_proto: bytes, path: str | None = None, eos: str = "sticky",
               pad_value: int = 1, clean: str = "canonicalize"):
    if eos not in ("none", "yes", "sticky"):
      raise TokenizerKindError(f"tokenizer eos={eos!r} is unknown; use 'none', 'yes' or 'sticky'")
    if clean not in CLEAN:
      raise TokenizerKindError(f"tokenizer clean={clean!r} is unknown; use one of {CLEAN}")
    self._proto, self.path = bytes(model_proto), path
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self.eos, self.clean, self.pad_id = eos, clean, int(pad_value)
    self.vocab_size = int(self._sp.get_piece_size())
    self.eot_id = int(self._sp.eos_id())
    if eos != "none" and self.eot_id < 0:
      raise TokenizerKindError(f"{path or 'the SentencePiece model'} has no EOS piece; use "
                               "--text_eos none")

  @classmethod
  def from_file(cls, path: str, **kw) -> "BigVisionTokenizer":
    return read_model(
        path, lambda proto: cls(proto, path=path, **kw), TokenizerKindError,
        missing=(f"SentencePiece model {path!r} not found; pass --tokenizer with the .model "
                 "file of the checkpoint (e.g. SigLIP's c4_en)"),
        not_a_model="pass the .model file", catch=RuntimeError)

  def __getstate__(self):
    return dict(proto=self._proto, path=self.path, eos=self.eos, pad_value=self.pad_id,
                clean=self.clean)

  def __setstate__(self, s):
    self.__init__(s["proto"], s["path"], s["eos"], s["pad_value"], s["clean"])

  def __repr__(self):
    return (f"BigVisionTokenizer(vocab_size={self.vocab_size}, eos={self.eos!r}, "
            f"pad={self.pad_id}, clean={self.clean!r}, path={self.path!r})")

  @property
  def model_proto(self) -> bytes:
    return self._proto

  def _clean(self, t: str) -> str:
    if self.clean == "lower":
      return t.lower()
    if self.clean == "canonicalize":
      return canonicalize(t)
    return t

  def encode(self, texts: str | Sequence[str], max_len: int) -> np.ndarray:
    texts = [self._clean(t) for t in as_texts(texts)]
    out = np.full((len(texts), int(max_len)), self.pad_id, np.int32)
    for i, ids in enumerate(self._sp.encode(texts, out_type=int)):
      if self.eos != "none":
        ids = ids + [self.eot_id]
      if len(ids) >= max_len and self.eos == "sticky":
        ids = ids[:max_len - 1] + [self.eot_id]
      ids = ids[:max_len]
      out[i, :len(ids)] = ids
    return out

  def __call__(self, texts, max_len: int) -> np.ndarray:
    return self.encode(texts, max_len)

  def decode(self, tokens) -> list[str]:
    arr = np.atleast_2d(np.asarray(tokens))
    out = []
    for row in arr.tolist():
      if self.eos != "none" and self.eot_id in row:
        row = row[:row.index(self.eot_id)]
      out.append(self._sp.decode([t for t in row if t != self.pad_id]))
    return out[:1] if np.asarray(tokens).ndim == 1 else out

  def save(self, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "wb") as f:
      f.write(self._proto)
    return path
