"""The tokenizer of a data config: `text.from_config`, or SentencePiece trained on the data.

Without a tokenizer file, the model is trained on the training splits' text (Glyphs
character names, ClassLabel names in the training templates, or the text feature) plus
the prompt-template words, cached next to the dataset and reused. Training is
deterministic, so every process gets the same model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import numpy as np

from fszjax import text
from fszjax.data import glyph_source
from fszjax.data.errors import DataError
from fszjax.data.preprocess import key_or_none, lookup, text_options, to_plain
from fszjax.data.sources import Opened, cfg_get, components, open_split

log = logging.getLogger(__name__)


def _tokenizer_cache_path(data_cfg, comps, opened0: Opened) -> str:
  tcfg = to_plain(data_cfg["tokenizer"] if isinstance(data_cfg, dict) else data_cfg.tokenizer)
  key_src = json.dumps([
      [(c["name"], c.get("train_split"), key_or_none(c.get("text_key")), key_or_none(c.get("label_key")),
        list(c.get("train_templates") or ()), glyph_source.config_name(c)) for c, _ in comps],
      list(cfg_get(data_cfg, "prompt_templates", ()) or ()), tcfg["max_texts"],
  ], sort_keys=True, default=str)
  key = hashlib.sha1(key_src.encode()).hexdigest()[:10]
  cache_dir = tcfg.get("cache_dir") or os.path.join(opened0.dataset_dir, "fszjax_tokenizer")
  return os.path.join(cache_dir, f"spm_{tcfg['model_type']}{int(tcfg['vocab_size'])}_{key}.model")


def _training_texts(cfg: dict[str, Any], opened: Opened, max_texts: int) -> list[str]:
  """Texts a tokenizer is trained on: class names (Glyphs / ClassLabel) or the text feature."""
  text_key = key_or_none(cfg.get("text_key"))
  if opened.glyph_meta is not None and text_key == "text":
    return list(opened.class_names)
  if text_key is None:
    if not opened.class_names:
      raise DataError(f"{opened.name}: no text to train a tokenizer on; set data.text_key or data.label_key")
    return [t.format(n) for n in opened.class_names for t in (cfg.get("train_templates") or ("{}",))]
  texts: list[str] = []
  n = len(opened.source)
  idx = np.linspace(0, n - 1, num=min(n, max_texts), dtype=np.int64) if n else []
  for i in idx:
    texts += text_options(lookup(opened.source[int(i)], text_key))
  return texts[:max_texts]


def get_tokenizer(data_cfg) -> Any:
  """The tokenizer of `data_cfg`: `tokenizer.path` if set, else trained on the training text.

  A trained model is cached (`<dataset dir>/fszjax_tokenizer/spm_<type><vocab>_<hash>.model`
  or `tokenizer.cache_dir`) and reused; training is deterministic, so every process
  gets the same model.
  """
  tcfg = to_plain(cfg_get(data_cfg, "tokenizer"))
  tok = text.from_config(tcfg)
  if tok is not None:
    return tok
  comps = components(data_cfg)
  opened = [open_split(c, c["train_split"]) for c, _ in comps]
  path = _tokenizer_cache_path(data_cfg, comps, opened[0])
  if os.path.exists(path):
    return text.load_tokenizer(path)
  texts: list[str] = []
  for (c, _), o in zip(comps, opened):
    texts += _training_texts(c, o, int(tcfg["max_texts"]))
  # Template words ("the character", "a photo of") get pieces too.
  templates = tuple(cfg_get(data_cfg, "prompt_templates", ()) or ())
  templates += tuple(cfg_get(data_cfg, "train_templates", ()) or ())
  for t in templates:
    if t.format("").strip():
      texts.append(t.format("").strip())
  tok = text.train_sentencepiece(texts, None, int(tcfg["vocab_size"]), tcfg["model_type"])
  try:
    tok.save(path)
  except OSError as e:
    log.warning("could not cache the tokenizer at %s (%s); set data.tokenizer.cache_dir", path, e)
  return tok
