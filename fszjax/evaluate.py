"""Evaluators: zero-shot classification and image-text retrieval.

Zero-shot: each class is described by its name through prompt templates ("a photo of
a {}") or by several free-text descriptions; the classifier row of a class is the mean
of its normalised text embeddings, renormalised. An image is assigned the class whose
row has the largest cosine similarity.

Retrieval: images and texts carry group ids (for COCO-style data the image index; for
class-named data the class); a retrieved item is a hit when its group matches. On caption
data (several captions per image, no labels) an image is right for each of its captions
and a caption for its image; zero-shot classification runs only where there are labels.
Recall is computed over chunks of queries, so the ``N x M`` similarity matrix is never
held whole.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fszjax.data import arrays as arrays_lib
from fszjax.data import sources, vocab
from fszjax.errors import UserError
from fszjax.models.two_tower import TwoTower


class EvalDataError(UserError):
  """An evaluation split that cannot be evaluated; the message names the fix."""


def l2_normalize(x, axis=-1):
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def build_class_texts(class_names: Sequence[str | Sequence[str]], templates: Sequence[str]):
  """Texts for every class: ``templates x name`` for a name, the descriptions as given for a
  list. Returns ``(texts, owner)`` with ``owner[i]`` the class of ``texts[i]``."""
  texts, owner = [], []
  for c, name in enumerate(class_names):
    if isinstance(name, str):
      items = [t.format(name) for t in templates] if templates else [name]
    else:
      items = list(name)
    if not items:
      raise ValueError(f"class {c} has no description")
    texts.extend(items)
    owner.extend([c] * len(items))
  return texts, np.asarray(owner)


def zero_shot_classifier(encode_texts: Callable[[list[str]], np.ndarray],
                         class_names: Sequence[str | Sequence[str]],
                         templates: Sequence[str] = ("{}",)) -> np.ndarray:
  """``(C, E)`` classifier: per class, the renormalised mean of its normalised text embeddings.

  ``encode_texts(list_of_str) -> (n, E)`` embeds texts (normalised or not).
  """
  texts, owner = build_class_texts(class_names, templates)
  z = l2_normalize(encode_texts(texts))
  num = len(class_names)
  sums = np.zeros((num, z.shape[1]), np.float32)
  np.add.at(sums, owner, z)
  return l2_normalize(sums / np.bincount(owner, minlength=num)[:, None])


def ci95(p: float, n: int) -> float:
  """Half-width of the normal-approximation 95% interval of a proportion."""
  return 1.96 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def topk_accuracy(zimg: np.ndarray, classifier: np.ndarray, labels: np.ndarray,
                  ks=(1, 5)) -> dict[str, float]:
  """Zero-shot accuracies: ``zimg (N, E)``, ``classifier (C, E)``, ``labels (N,)``."""
  sims = l2_normalize(zimg) @ classifier.T
  num_classes = classifier.shape[0]
  order = np.argsort(-sims, axis=1, kind="stable")
  labels = np.asarray(labels)
  out = {}
  for k in ks:
    kk = min(k, num_classes)
    out[f"top{k}"] = float(np.mean(np.any(order[:, :kk] == labels[:, None], axis=1)))
  n = len(labels)
  out.update(num_classes=num_classes, chance=1.0 / num_classes, num_examples=n,
             top1_ci95=ci95(out["top1"], n))
  return out


def _first_hit_ranks(queries: np.ndarray, items: np.ndarray, query_group: np.ndarray,
                     item_group: np.ndarray, chunk_elements: int) -> np.ndarray:
  """Rank (0-based) of the first right item of each query, over chunks of queries.

  The rank is the number of wrong items scoring at least the best right item: ties count
  against the query, so recall never depends on storage order and a collapsed model
  (all similarities equal) scores as it deserves. NaN similarities count as -inf.
  """
  num_items = len(items)
  rows = max(1, chunk_elements // max(num_items, 1))
  ranks = np.empty(len(queries), np.int64)
  for s in range(0, len(queries), rows):
    sims = np.nan_to_num(queries[s:s + rows] @ items.T, nan=-np.inf)  # (b, M)
    right = query_group[s:s + rows, None] == item_group[None, :]
    if not right.any(axis=1).all():
      raise ValueError("retrieval_metrics: a query has no right item among the candidates")
    best = np.where(right, sims, -np.inf).max(axis=1, keepdims=True)
    ranks[s:s + rows] = np.sum((sims >= best) & ~right, axis=1)
  return ranks


def retrieval_metrics(zimg: np.ndarray, ztxt: np.ndarray, img_group: np.ndarray,
                      txt_group: np.ndarray, ks=(1, 5, 10),
                      chunk_elements: int = 1 << 24) -> dict[str, float]:
  """Recall@K both ways. ``zimg (N, E)``, ``ztxt (M, E)``, group ids ``(N,)`` and ``(M,)``.

  A text is right for an image when their group ids are equal, so an image may have several
  right texts (COCO: group = image index, each image owning its captions) and a text
  several right images (class names: group = class). ``i2t_r{k}``: fraction of images with
  a right text among their k best; ``t2i_r{k}`` likewise for texts. Ties with a wrong item
  count as misses (see `_first_hit_ranks`). Similarities are computed in chunks of at most
  ``chunk_elements`` entries. Every image and text needs at least one right counterpart.
  """
  zimg, ztxt = l2_normalize(zimg), l2_normalize(ztxt)
  img_group, txt_group = np.asarray(img_group), np.asarray(txt_group)
  if len(img_group) != len(zimg) or len(txt_group) != len(ztxt):
    raise ValueError(f"retrieval_metrics: {len(zimg)} images / {len(img_group)} image groups, "
                     f"{len(ztxt)} texts / {len(txt_group)} text groups")
  i2t = _first_hit_ranks(zimg, ztxt, img_group, txt_group, chunk_elements)
  t2i = _first_hit_ranks(ztxt, zimg, txt_group, img_group, chunk_elements)
  out = {}
  for k in ks:
    out[f"i2t_r{k}"] = float(np.mean(i2t < k))
    out[f"t2i_r{k}"] = float(np.mean(t2i < k))
  out.update(num_images=int(len(img_group)), num_texts=int(len(txt_group)))
  return out


def caption_groups(captions: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
  """Flattens per-image caption lists: ``(texts, owner)`` with ``owner[j]`` the image of
  ``texts[j]``. Images may have any number of captions (none included)."""
  texts, owner = [], []
  for i, caps in enumerate(captions):
    texts.extend(caps)
    owner.extend([i] * len(caps))
  return texts, np.asarray(owner, np.int64)


def _replicated_like(tree) -> dict:
  """``{"out_shardings": replicated}`` on the mesh of `tree`'s arrays ({} off a mesh)."""
  for x in jax.tree.leaves(tree):
    sh = getattr(x, "sharding", None)
    if isinstance(sh, NamedSharding):
      return {"out_shardings": NamedSharding(sh.mesh, PartitionSpec())}
  return {}


class EmbeddingEncoder:
  """Batched, jitted image / text encoders of a `TwoTower` with fixed parameters."""

  def __init__(self, model, params, tokenizer=None, max_len: int | None = None,
               batch_size: int = 256):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.max_len = max_len or model.txt.max_len
    self.batch_size = batch_size
    # Replicated outputs: in a multi-host job every process reads the embeddings.
    out = _replicated_like(params)
    self._img = jax.jit(lambda p, x: model.apply({"params": p}, x, method=TwoTower.encode_image),
                        **out)
    self._txt = jax.jit(lambda p, t: model.apply({"params": p}, t, method=TwoTower.encode_text),
                        **out)

  def _batched(self, fn, x):
    n = len(x)
    if n == 0:
      raise ValueError("nothing to encode")
    outs = []
    bs = self.batch_size
    for i in range(0, n, bs):
      chunk = np.asarray(x[i:i + bs])
      pad = bs - len(chunk) if n > bs else 0
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
      out = np.asarray(fn(self.params, chunk))
      outs.append(out[: len(out) - pad] if pad else out)
    return np.concatenate(outs)

  def images(self, images) -> np.ndarray:
    return self._batched(self._img, images)

  def tokens(self, tokens) -> np.ndarray:
    return self._batched(self._txt, tokens)

  def texts(self, texts: list[str]) -> np.ndarray:
    if self.tokenizer is None:
      raise ValueError("encoding text needs a tokenizer")
    return self.tokens(self.tokenizer.encode(list(texts), self.max_len))


def evaluate_split(encoder: EmbeddingEncoder, arrays: dict, templates: Sequence[str],
                   retrieval: bool = True) -> tuple[dict, dict | None]:
  """Zero-shot (and class-name retrieval) metrics on one split's arrays
  (``image``, ``label``, ``class_names``). Labels index ``class_names``; classes absent
  from the split are still candidates (the task is over the split's class list)."""
  zimg = encoder.images(arrays["image"])
  names = list(arrays["class_names"])
  classifier = zero_shot_classifier(encoder.texts, names, templates)
  zs = topk_accuracy(zimg, classifier, arrays["label"])
  ret = None
  if retrieval:
    present = np.unique(arrays["label"])
    ztxt = encoder.texts([names[c] for c in present])
    ret = retrieval_metrics(zimg, ztxt, arrays["label"], present)
  return zs, ret


def evaluate_captions(encoder: EmbeddingEncoder, arrays: dict, ks=(1, 5, 10)) -> dict:
  """Image<->caption recall@K on one split's arrays (``image``, ``captions``: a list of
  caption lists, one per image). Images without captions are left out of the queries and
  candidates and counted in ``images_without_captions``."""
  captions = arrays["captions"]
  keep = np.asarray([i for i, caps in enumerate(captions) if len(caps)], np.int64)
  if len(keep) == 0:
    raise EvalDataError(f"no image of the split has a caption ({len(captions)} images); check "
                        "data.text_key or choose another eval split")
  texts, owner = caption_groups([captions[i] for i in keep])
  zimg = encoder.images(arrays["image"])[keep]
  ztxt = encoder.texts(texts)
  out = retrieval_metrics(zimg, ztxt, np.arange(len(keep)), owner, ks=ks)
  counts = np.bincount(owner, minlength=len(keep))
  out.update(images_without_captions=int(len(captions) - len(keep)),
             captions_per_image_min=int(counts.min()), captions_per_image_max=int(counts.max()))
  return out


def remap_to_present(arrays: dict) -> dict:
  """Restricts the class list to the classes present in the split (labels renumbered).
  Arrays without class names (caption data) are returned as they are."""
  labels = np.asarray(arrays["label"])
  if not arrays.get("class_names") or len(labels) == 0:
    return arrays
  present = np.unique(labels)
  if present[0] < 0:
    raise EvalDataError("a labelled eval split has examples without a label (-1); check "
                        "data.label_key")
  remap = -np.ones(int(present.max()) + 1, np.int64)
  remap[present] = np.arange(len(present))
  out = dict(arrays)
  out["label"] = remap[labels]
  out["class_names"] = [arrays["class_names"][c] for c in present]
  return out


def run_evaluators(config, model, params, tokenizer=None, splits=None, arrays_cache=None,
                   max_examples: int | None = None) -> dict:
  """Zero-shot + retrieval on the config's eval splits. Returns the summary-format dict
  ``{"zeroshot": {split: {...}}, "retrieval": {split: {...}}}``.

  A split with class names (labels) gets zero-shot classification and image<->class-name
  retrieval; a split without labels but with captions (``data.text_key``, e.g.
  ``captions/text``) gets image<->caption retrieval only."""
  dcfg = config.data
  ecfg = config.eval
  splits = list(splits or ecfg.splits or dcfg.eval_splits)
  max_examples = max_examples or ecfg.max_examples or None
  tokenizer = tokenizer or vocab.get_tokenizer(dcfg)
  templates = list(sources.prompt_templates(dcfg))
  encoder = EmbeddingEncoder(model, params, tokenizer, max_len=config.model.text.max_len,
                    batch_size=int(ecfg.batch_size))
  out = {"zeroshot": {}, "retrieval": {}}
  cache = arrays_cache if arrays_cache is not None else {}
  for split in splits:
    if split not in cache:
      cache[split] = remap_to_present(arrays_lib.load_split_arrays(dcfg, split, max_examples))
    arrays = cache[split]
    if len(arrays["image"]) == 0:
      raise EvalDataError(f"eval split {split!r} has no decodable image; choose another "
                          "config.eval.splits")
    if arrays.get("class_names"):
      zs, ret = evaluate_split(encoder, arrays, templates)
      out["zeroshot"][split] = zs
      if ret is not None:
        out["retrieval"][split] = ret
    elif arrays.get("captions") is not None:
      out["retrieval"][split] = evaluate_captions(encoder, arrays)
    else:
      raise EvalDataError(f"eval split {split!r} has neither labels nor captions; set "
                          "data.label_key to a ClassLabel feature or data.text_key to a text feature")
  return out
