"""SentencePiece tokenizer with open_clip-style fixed-length batches.

`Tokenizer.encode(texts, max_len)` returns int32 (B, L): the SentencePiece ids of each
text, then one end-of-text token (EOT), then padding with id 0. EOT is the HIGHEST id of
the vocabulary, so the text tower's `eot` pooling (argmax over token ids) finds it.
Texts longer than `max_len - 1` pieces are truncated and EOT stays at the last position.

Id layout: SentencePiece ids (shifted by one when the model's own pad id is not 0, so
that id 0 is always padding) and then EOT = vocab_size - 1.
"""

from __future__ import annotations

import io
import re
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from fszjax.text.base import (TokenizerError, as_texts, atomic_write, decode_batch, ids_until,
                              read_model)

MODEL_TYPES = ("unigram", "bpe", "word", "char")


class Tokenizer:
  """Fixed-length batch tokenizer over a SentencePiece model (picklable, thread-safe reads).

  Attributes:
    vocab_size: number of ids, EOT included (ids are in [0, vocab_size)).
    pad_id: 0.
    eot_id: vocab_size - 1 (the highest id).
  """

  pad_id = 0

  def __init__(self, model_proto: bytes, path: str | None = None):
    self._proto = bytes(model_proto)
    self.path = path
    self._load()

  def _load(self):
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    # Id 0 must be padding: keep SentencePiece's ids when its pad is 0, else shift by one.
    self._offset = 0 if self._sp.pad_id() == 0 else 1
    self.vocab_size = int(self._sp.get_piece_size()) + self._offset + 1
    self.eot_id = self.vocab_size - 1

  def __getstate__(self):
    return {"proto": self._proto, "path": self.path}

  def __setstate__(self, state):
    self._proto, self.path = state["proto"], state["path"]
    self._load()

  def __repr__(self):
    return f"Tokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id}, path={self.path!r})"

  @property
  def model_proto(self) -> bytes:
    return self._proto

  def encode(self, texts: str | Sequence[str], max_len: int) -> np.ndarray:
    """Texts -> int32 (B, max_len): pieces, EOT, then pad 0 (a single str gives B = 1)."""
    if max_len < 2:
      raise TokenizerError(f"max_len={max_len} leaves no room for text and EOT; use >= 2")
    texts = as_texts(texts)
    out = np.zeros((len(texts), max_len), np.int32)
    for i, text in enumerate(texts):
      # One string per call: SentencePiece's list path starts a thread pool per call (~20x slower).
      ids = self._sp.encode(text, out_type=int)[: max_len - 1]
      n = len(ids)
      if n:
        out[i, :n] = np.asarray(ids, np.int32) + self._offset
      out[i, n] = self.eot_id
    return out

  def decode(self, tokens) -> list[str]:
    """int (B, L) or (L,) tokens -> B strings (everything from EOT on is dropped)."""
    return decode_batch(tokens, lambda row: self._sp.decode(
        [t - self._offset for t in ids_until(row, self.eot_id, self.pad_id)]))

  def save(self, path: str) -> str:
    """Writes the SentencePiece model to `path` (atomically)."""
    atomic_write(path, self._proto)
    self.path = path
    return path


def train_sentencepiece(texts: Iterable[str], out_prefix: str | None, vocab_size: int,
                        model_type: str = "bpe") -> Tokenizer:
  """Trains a SentencePiece model so that the resulting `Tokenizer.vocab_size == vocab_size`.

  Deterministic: same texts (same order) and settings -> the same model. Writes
  `<out_prefix>.model` (atomically) unless `out_prefix` is None.
  """
  if model_type not in MODEL_TYPES:
    raise TokenizerError(f"tokenizer model_type={model_type!r} is unknown; use one of {MODEL_TYPES}")
  if vocab_size < 4:
    raise TokenizerError(f"tokenizer vocab_size={vocab_size} is too small; use >= 4")
  texts = [t for t in as_texts(list(texts)) if t.strip()]
  if not texts:
    raise TokenizerError("no text to train the tokenizer on; check the dataset's text key")
  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        vocab_size=int(vocab_size) - 1,  # + EOT
        model_type=model_type,
        pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
        character_coverage=1.0,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        hard_vocab_limit=True,
        minloglevel=2,
    )
  except RuntimeError as e:
    m = re.search(r"value <= (\d+)", str(e))
    if m:
      raise TokenizerError(
          f"tokenizer vocab_size={vocab_size} is too large for this text; use <= "
          f"{int(m.group(1)) + 1} (config data.tokenizer.vocab_size)") from None
    raise TokenizerError(f"SentencePiece training failed: {str(e).splitlines()[0]}") from None
  tok = Tokenizer(buf.getvalue())
  if out_prefix is not None:
    tok.save(out_prefix + ".model")
  return tok


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a SentencePiece `.model` file."""
  return read_model(
      path, lambda proto: Tokenizer(proto, path=path), TokenizerError,
      missing=(f"tokenizer model {path!r} not found; set data.tokenizer.path to an existing "
               ".model or leave it empty to train one"),
      not_a_model="point data.tokenizer.path at a .model file")
