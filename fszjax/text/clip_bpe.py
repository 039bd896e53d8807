"""The CLIP byte-level BPE tokenizer (OpenAI CLIP / open_clip), written for fszjax.

    tok = ClipBpeTokenizer.from_file("bpe_simple_vocab_16e6.txt.gz")  # or find_bpe_file()
    tok.encode(["a photo of a cat"], 77)   # int32 (1, 77): SOT, pieces, EOT, then 0s

Same ids as ``open_clip.tokenize``: vocabulary 49408 = 256 byte symbols, their 256
end-of-word forms, 48894 merges, then ``<start_of_text>`` (49406) and ``<end_of_text>``
(49407, the highest id, so the text tower's ``eot`` pooling finds it). Texts are cleaned
as open_clip's default ("lower"): ftfy fix (when ftfy is installed), HTML unescape twice,
whitespace collapsed, lower-cased. Too-long texts are cut and end with EOT.

No network: the merges come from a local file, the ``bpe_simple_vocab_16e6.txt.gz`` that
ships inside the open_clip (and OpenAI CLIP) wheels. `find_bpe_file` locates it in an
installed open_clip without importing it (no torch import); converted model
directories keep a copy next to their checkpoint.

Splitting uses the ``regex`` module's ``\\p{L}``/``\\p{N}`` classes when installed (it is an
open_clip dependency); without it an equivalent ``re`` pattern is used, which differs only
for rare characters (non-decimal digits such as "²").
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
import re
from typing import Sequence

import numpy as np

from fszjax.text.base import TokenizerError, as_texts, decode_batch, ids_until

# Optional, as in open_clip: `regex` (Unicode classes; `re` approximates them) and `ftfy`
# (mojibake fixes) are used when installed.
try:
  import regex
except ImportError:
  regex = None
try:
  import ftfy
except ImportError:
  ftfy = None

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2
SOT, EOT = "<start_of_text>", "<end_of_text>"
ENV_VAR = "FSZJAX_CLIP_BPE"


class ClipBpeError(TokenizerError):
  """Missing or unreadable BPE vocabulary; the message names the fix."""


@functools.lru_cache(maxsize=None)
def byte_to_unicode() -> dict[int, str]:
  """The reversible byte -> printable character map of GPT-2/CLIP byte-level BPE."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  codes = list(printable)
  extra = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      codes.append(256 + extra)
      extra += 1
  return dict(zip(printable, map(chr, codes)))


def find_bpe_file(path: str | None = None) -> str:
  """The BPE vocabulary file: `path`, else $FSZJAX_CLIP_BPE, else the one inside an
  installed open_clip (or OpenAI ``clip``) package."""
  if path:
    if not os.path.isfile(path):
      raise ClipBpeError(f"CLIP BPE vocabulary {path!r} not found; pass the path of "
                         f"{BPE_FILENAME} (it ships inside the open_clip wheel)")
    return path
  if os.environ.get(ENV_VAR):
    return find_bpe_file(os.environ[ENV_VAR])
  for pkg in ("open_clip", "clip"):
    try:
      spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
      spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
      cand = os.path.join(loc, BPE_FILENAME)
      if os.path.isfile(cand):
        return cand
  raise ClipBpeError(f"no CLIP BPE vocabulary found; pass --bpe PATH/{BPE_FILENAME}, set "
                     f"${ENV_VAR}, or `pip install open-clip-torch` (the file ships in its wheel)")


def _split_pattern():
  specials = f"{SOT}|{EOT}|"
  if regex is not None:
    return regex.compile(specials + r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                         regex.IGNORECASE)
  return re.compile(specials + r"""'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+""",
                    re.IGNORECASE)


def clean_text(text: str) -> str:
  """open_clip's default "lower" cleaning: ftfy fix, HTML unescape x2, whitespace, lower."""
  if ftfy is not None:
    text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return " ".join(text.split()).strip().lower()


class ClipBpeTokenizer:
  """Fixed-length batch tokenizer with open_clip's ids (same interface as
  `fszjax.text.sentencepiece.Tokenizer`).

  Attributes:
    vocab_size: 49408.
    sot_id: 49406; eot_id: 49407 (the highest id); pad_id: 0.
    context_length: default length of `__call__` (77).
  """

  pad_id = 0

  def __init__(self, merges_text: str, path: str | None = None, context_length: int = 77):
    self.path = path
    self.context_length = int(context_length)
    lines = merges_text.split("\n")[1:NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
      raise ClipBpeError(f"{path or 'the BPE text'} is not a CLIP BPE merges file (expected "
                         f"{NUM_MERGES} merge lines); pass the {BPE_FILENAME} from open_clip")
    self._merges_text = merges_text
    symbols = list(byte_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    self.encoder = {s: i for i, s in enumerate(vocab)}
    self.decoder = dict(enumerate(vocab))
    self.ranks = {m: i for i, m in enumerate(merges)}
    self.vocab_size = len(vocab)
    self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
    self._byte_enc = byte_to_unicode()
    self._byte_dec = {c: b for b, c in self._byte_enc.items()}
    self._pat = _split_pattern()
    self._cache = {SOT: SOT, EOT: EOT}

  @classmethod
  def from_file(cls, path: str | None = None, context_length: int = 77) -> "ClipBpeTokenizer":
    """Reads a (gzipped or plain) merges file; `None` finds it (see `find_bpe_file`)."""
    path = find_bpe_file(path)
    try:
      with open(path, "rb") as f:
        raw = f.read()
      text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
      raise ClipBpeError(f"cannot read the CLIP BPE vocabulary {path!r} ({e}); pass an intact "
                         f"{BPE_FILENAME}") from None
    return cls(text, path=path, context_length=context_length)

  def __getstate__(self):
    return {"text": self._merges_text, "path": self.path, "context_length": self.context_length}

  def __setstate__(self, state):
    self.__init__(state["text"], state["path"], state["context_length"])

  def __repr__(self):
    return f"ClipBpeTokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id}, path={self.path!r})"

  def _bpe(self, token: str) -> list[str]:
    if token in self._cache:
      return self._cache[token].split(" ")
    word = list(token[:-1]) + [token[-1] + "</w>"]
    while len(word) > 1:
      pairs = {(a, b) for a, b in zip(word, word[1:])}
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    self._cache[token] = " ".join(word)
    return word

  def encode_text(self, text: str) -> list[int]:
    """One text -> its BPE ids (no SOT/EOT)."""
    ids = []
    for piece in self._pat.findall(clean_text(text)):
      piece = "".join(self._byte_enc[b] for b in piece.encode("utf-8"))
      ids.extend(self.encoder[t] for t in self._bpe(piece))
    return ids

  def encode(self, texts: str | Sequence[str], max_len: int | None = None) -> np.ndarray:
    """Texts -> int32 ``(B, max_len)``: SOT, pieces, EOT, then 0 (a str gives B = 1)."""
    texts = as_texts(texts)
    max_len = int(max_len or self.context_length)
    if max_len < 2:
      raise ClipBpeError(f"max_len={max_len} leaves no room for SOT and EOT; use >= 2")
    out = np.zeros((len(texts), max_len), np.int32)
    for i, t in enumerate(texts):
      ids = [self.sot_id] + self.encode_text(t) + [self.eot_id]
      if len(ids) > max_len:
        ids = ids[:max_len]
        ids[-1] = self.eot_id
      out[i, :len(ids)] = ids
    return out

  def __call__(self, texts, context_length: int | None = None) -> np.ndarray:
    return self.encode(texts, context_length)

  def decode(self, tokens) -> list[str]:
    """int ``(B, L)`` or ``(L,)`` -> B strings (SOT, EOT and what follows EOT dropped)."""

    def decode_row(row: list[int]) -> str:
      chars = "".join(self.decoder[t] for t in ids_until(row, self.eot_id, self.sot_id))
      text = bytearray(self._byte_dec[c] for c in chars).decode("utf-8", errors="replace")
      return text.replace("</w>", " ").strip()

    return decode_batch(tokens, decode_row)

  def save(self, path: str) -> str:
    """Writes the merges (gzipped) to `path`, e.g. next to a converted checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with gzip.open(tmp, "wb") as f:
      f.write(self._merges_text.encode("utf-8"))
    os.replace(tmp, path)
    self.path = path
    return path
