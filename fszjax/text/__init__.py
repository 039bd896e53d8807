"""Every tokenizer fszjax uses, chosen by ``config.data.tokenizer`` through `from_config`.

  kind                 class                                  ids
  sentencepiece        `sentencepiece.Tokenizer` (fszjax's)   pieces, EOT = highest id, pad 0
  clip_bpe             `clip_bpe.ClipBpeTokenizer`            open_clip's CLIP BPE
  big_vision           `big_vision.BigVisionTokenizer`        a SentencePiece model used the
                                                              big_vision way (SigLIP's tokens)

All share ``encode(texts, max_len) -> int32 (B, max_len)``, ``decode``, ``save``,
``vocab_size``, ``eot_id`` and ``pad_id``, so the encoders can use any of them. A
sentencepiece config without a ``path`` is trained on the data's text: that is
`fszjax.data.vocab.get_tokenizer`, the data layer's entry point over this one.
"""

from __future__ import annotations

from fszjax.text.base import TokenizerError
from fszjax.text.big_vision import BigVisionTokenizer, TokenizerKindError
from fszjax.text.clip_bpe import ClipBpeError, ClipBpeTokenizer
from fszjax.text.files import copy_to_workdir, resolve_path
from fszjax.text.sentencepiece import Tokenizer, load_tokenizer, train_sentencepiece

KINDS = ("sentencepiece", "clip_bpe", "big_vision")

__all__ = ["KINDS", "BigVisionTokenizer", "ClipBpeError", "ClipBpeTokenizer", "Tokenizer",
           "TokenizerError", "TokenizerKindError", "copy_to_workdir", "from_config",
           "load_tokenizer", "resolve_path", "train_sentencepiece"]


def from_config(tcfg, base_dir: str | None = None):
  """The tokenizer ``config.data.tokenizer`` (a dict or ConfigDict) names.

  clip_bpe: the merges file at ``path`` (found in an installed open_clip without one);
  big_vision: the SentencePiece ``path`` with ``eos`` / ``pad_value`` / ``clean``;
  sentencepiece: fszjax's `Tokenizer` from ``path``, or ``None`` without a path (the
  tokenizer is then trained on the data: `fszjax.data.vocab.get_tokenizer`).
  ``base_dir`` (the directory of config.json) resolves relative / moved paths.
  """
  get = tcfg.get if hasattr(tcfg, "get") else (lambda k, d=None: getattr(tcfg, k, d))
  kind = get("kind", None) or "sentencepiece"
  if kind not in KINDS:
    raise TokenizerKindError(f"data.tokenizer.kind={kind!r} is unknown; use one of {KINDS}")
  path = resolve_path(get("path", None), base_dir)
  if kind == "sentencepiece":
    return load_tokenizer(path) if path else None
  if kind == "clip_bpe":
    return ClipBpeTokenizer.from_file(path or None)
  if not path:
    raise TokenizerKindError("data.tokenizer.kind=big_vision needs data.tokenizer.path: the "
                             "SentencePiece .model of the checkpoint (or fszjax.load(path, "
                             "tokenizer='FILE.model'))")
  return BigVisionTokenizer.from_file(path, eos=get("eos", "sticky") or "sticky",
                                      pad_value=int(get("pad_value", 1)),
                                      clean=get("clean", "canonicalize") or "canonicalize")
