"""A whole split as numpy arrays (evaluation, few-shot episodes), preprocessed like training
but without augmentation."""

from __future__ import annotations

from typing import Any

import numpy as np

from fszjax.data import glyph_source
from fszjax.data.preprocess import SKIP, ExampleProcessor, SkipCounter, as_str, key_or_none, lookup, text_options
from fszjax.data.sources import Opened, flat_features, open_split, single_component


class _Columns:
  """The per-example lists `load_split_arrays` fills, one example at a time."""

  def __init__(self, opened: Opened, domain_key: str | None):
    self.opened, self.domain_key = opened, domain_key
    dfeat = flat_features(opened.features).get(domain_key) if domain_key else None
    self.domain_names = list(dfeat.names) if dfeat is not None and hasattr(dfeat, "names") else None
    self.font_list = opened.glyph_meta["fonts"] if opened.glyph_meta else None
    self.images, self.labels, self.texts, self.captions = [], [], [], []
    self.domains, self.dnames, self.cps, self.scripts = [], [], [], []

  def add(self, ex: dict, out: dict, text_key: str | None) -> None:
    label = int(out["label"])
    self.images.append(out["image"])
    self.labels.append(label)
    class_names = self.opened.class_names
    if text_key is not None:
      options = text_options(lookup(ex, text_key))
      self.texts.append(options[0] if options else "")
      self.captions.append(options)
    elif class_names is not None and label >= 0:
      self.texts.append(class_names[label])
    else:
      self.texts.append("")
    if self.domain_key is not None:
      self._add_domain(lookup(ex, self.domain_key))
    if self.opened.glyph_meta is not None:
      cp, script = glyph_source.example_fields(ex)
      self.cps.append(cp)
      self.scripts.append(script)

  def _add_domain(self, v) -> None:
    if self.domain_names is not None:
      self.domains.append(int(np.asarray(v)))
      self.dnames.append(self.domain_names[int(np.asarray(v))])
    elif isinstance(v, (bytes, str)) or (isinstance(v, np.ndarray) and v.dtype.kind in "OSU"):
      s = as_str(v)
      self.dnames.append(s)
      self.domains.append(self.font_list.index(s) if self.font_list and s in self.font_list else -1)
    else:
      self.domains.append(int(np.asarray(v)))


def load_split_arrays(data_cfg, split: str, max_examples: int | None = None, *,
                      dataset: str | None = None, seed: int = 0) -> dict[str, Any]:
  """A whole split as numpy arrays, preprocessed like training but without augmentation.

  Returns:
    image: float32 (N, H, W, C); label: int32 (N,); text: list of N str (the example's
    text, or its class name); captions (only with data.text_key): list of N lists of str,
    every text of the example (COCO's `captions/text` gives several, in any number); domain: (N,) int32 domain ids (-1 if none) and font /
    domain_name: list of N str when the dataset has them; codepoint, script (Glyphs);
    class_names: list of str in label order (None without labels); num_skipped: int.
    With `max_examples`, a seeded random subset (kept in storage order).
  """
  c = single_component(data_cfg, dataset)
  opened = open_split(c, split)
  n = len(opened.source)
  idx = np.arange(n)
  if max_examples is not None and max_examples < n:
    idx = np.sort(np.random.default_rng(seed).permutation(n)[:max_examples])
  counter = SkipCounter()
  proc = ExampleProcessor(c, opened.class_names, None, train=False, counter=counter)
  cols = _Columns(opened, key_or_none(c.get("domain_key")))
  for i in idx:
    ex = opened.source[int(i)]
    out = proc(ex, None)
    if SKIP not in out:
      cols.add(ex, out, proc.text_key)
  size, ch = int(c["image_size"]), int(c["channels"])
  out = {
      "image": (np.stack(cols.images).astype(np.float32) if cols.images
                else np.zeros((0, size, size, ch), np.float32)),
      "label": np.asarray(cols.labels, np.int32),
      "text": cols.texts,
      "domain": (np.asarray(cols.domains, np.int32) if cols.domains
                 else np.full((len(cols.labels),), -1, np.int32)),
      "class_names": opened.class_names,
      "num_skipped": counter.count,
  }
  if proc.text_key is not None:
    out["captions"] = cols.captions
  if cols.dnames:
    out["domain_name"] = cols.dnames
    if opened.glyph_meta is not None:
      out["font"] = cols.dnames
  if opened.glyph_meta is not None:
    out["codepoint"] = np.asarray(cols.cps, np.int64)
    out["script"] = cols.scripts
  return out
