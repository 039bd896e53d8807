"""Few-shot from Python: a classifier adapted from a handful of labelled images.

    import fszjax
    model = fszjax.load("runs/glyphs/pretrain")      # workdir, checkpoint or converted dir
    clf = model.few_shot(support_images, support_labels, class_names=names, method="wise_ft")
    clf.predict(query_images)                        # labels, in the support labels' terms
    clf.logits(query_images)                         # (B, N) float32

Images are PIL images, uint8 arrays ((H, W[, C]) each, or (B, H, W, C)), or float arrays
already preprocessed by ``model.preprocess``. Methods (the ones `fszjax adapt` evaluates,
built from the same functions of `fszjax.fewshot.inner` / `meta` / `dg`):

  zeroshot       the text tower's classifier over ``class_names`` (no support set needed)
  protonet       nearest class mean of the support features (ProtoNets, no training)
  zs_head_adapt  the zero-shot head adapted by ``steps`` SGD steps of ``lr`` on the
                 support set (`meta.adapt` with ANIL's inner loop); 0 steps = zeroshot
  finetune       the last ``blocks`` blocks of the image tower and the zero-shot head,
                 fine-tuned together by ``steps`` SGD steps on the support images
  wise_ft        WiSE-FT: ``(1 - alpha) * zero-shot + alpha * adapted`` weights, the
                 adapted ones from zs_head_adapt (``blocks=0``) or finetune (``blocks>0``)
  proto_zs       the zero-shot + prototype head (`fszjax.fewshot.transfer`), then ``steps``
                 SGD steps of ``lr``: with >= 2 images per class the names / prototypes mix
                 is chosen on the support set by leave-one-out, with 1 image it is
                 ``proto_weight`` (default 0.5) scaled down where the names fail on the
                 support set; ``proto_weight=1, steps=0`` is ProtoNets

Fitting and prediction are jit-compiled (cached per task shape and settings on the model).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fszjax.errors import UserError
from fszjax.fewshot import dg as dg_lib
from fszjax.fewshot import inner as inner_lib
from fszjax.fewshot import meta as meta_lib
from fszjax.fewshot import transfer
from fszjax.models.two_tower import build_image_tower

METHODS = ("zeroshot", "protonet", "zs_head_adapt", "finetune", "wise_ft", "proto_zs")
NEEDS_NAMES = ("zeroshot", "zs_head_adapt", "finetune", "wise_ft", "proto_zs")
# steps, lr. zs_head_adapt's are `fszjax adapt`'s head_steps / head_lr; proto_zs's are
# what val_classes chose for the Glyphs towers at every setting (BUILD_NOTES.md, "Transfer:
# fourth round").
DEFAULTS = {"zs_head_adapt": (10, 0.5), "finetune": (20, 0.05), "wise_ft": (10, 0.5),
            "proto_zs": (100, 8.0)}
PROTO_ZS_WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)  # the leave-one-out candidates (>= 2 shots)


class FewShotError(UserError):
  """Bad few-shot input (labels, class names, method); the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Task:
  """Indices of one N-way K-shot task drawn from a labelled set (see `split_task`)."""

  classes: np.ndarray  # (N,) original labels of the task's classes
  support: np.ndarray  # (N * K,) indices into the labelled set
  support_y: np.ndarray  # (N * K,) task labels 0..N-1
  query: np.ndarray  # indices of every other example of those classes
  query_y: np.ndarray


def split_task(labels, n_way: int, k_shot: int, seed: int = 0) -> Task:
  """Draws `n_way` classes with more than `k_shot` examples each from `labels` (N,), and
  per class `k_shot` support examples; all their other examples are queries."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  values, counts = np.unique(labels, return_counts=True)
  eligible = values[counts > k_shot]
  if len(eligible) < n_way:
    raise FewShotError(f"only {len(eligible)} classes have more than {k_shot} examples; lower "
                       "n_way or k_shot")
  classes = np.sort(rng.choice(eligible, n_way, replace=False))
  sup, sup_y, qry, qry_y = [], [], [], []
  for i, c in enumerate(classes):
    idx = rng.permutation(np.nonzero(labels == c)[0])
    sup += list(idx[:k_shot])
    sup_y += [i] * k_shot
    qry += list(idx[k_shot:])
    qry_y += [i] * (len(idx) - k_shot)
  return Task(classes, np.asarray(sup), np.asarray(sup_y, np.int32), np.asarray(qry),
              np.asarray(qry_y, np.int32))


def _identity(_, x):
  return x


def _labels(support_labels, class_names):
  """(task labels 0..N-1, the label of each column, class names or None)."""
  labels = list(np.asarray(support_labels).tolist()) if isinstance(support_labels, np.ndarray) \
      else list(support_labels)
  if not labels:
    raise FewShotError("the support set is empty; pass at least one image per class")
  if class_names is not None:
    names = [str(n) for n in class_names]
    if isinstance(labels[0], str):
      unknown = sorted(set(labels) - set(names))
      if unknown:
        raise FewShotError(f"support labels {unknown[:3]} are not in class_names; label the "
                           "images with class names or with indices into class_names")
      return np.asarray([names.index(x) for x in labels], np.int32), names, names
    ys = np.asarray(labels)
    if ys.dtype.kind not in "iu" or ys.min() < 0 or ys.max() >= len(names):
      raise FewShotError(f"support labels must be class names or integers in [0, {len(names)}) "
                         "indexing class_names")
    return ys.astype(np.int32), list(range(len(names))), names
  columns = sorted(set(labels))
  return np.asarray([columns.index(x) for x in labels], np.int32), columns, \
      (columns if isinstance(columns[0], str) else None)


def _cached(model, key, build):
  cache = model.__dict__.setdefault("_fewshot_jit", {})
  if key not in cache:
    cache[key] = build()
  return cache[key]


def _tower_features(model):
  """``features_fn(img_params, x) -> (B, E)`` L2-normalised image embeddings."""
  tower = build_image_tower(model.config.model)

  def features(backbone, x):
    z, _ = tower.apply({"params": backbone}, x)
    return inner_lib.l2_normalize(z)

  return features


@dataclasses.dataclass
class FewShotClassifier:
  """An adapted classifier: ``logits = features(images) @ head['w'] + head['b']``.

  ``backbone`` is None when the image tower is unchanged (features from the loaded model),
  else the adapted image-tower params. ``labels[j]`` is the label of column j.
  """

  model: Any
  method: str
  head: dict
  labels: list
  class_names: list | None
  backbone: Any = None

  def features(self, images) -> np.ndarray:
    """(B, E) L2-normalised image embeddings under this classifier's image tower."""
    if self.backbone is None:
      return self.model.encode_image(images)
    x = self.model.image_batch(images)
    fn = _cached(self.model, ("features",), lambda: jax.jit(_tower_features(self.model)))
    bs = max(1, int(self.model.batch_size))
    with _precision(self.model):
      return np.concatenate([np.asarray(fn(self.backbone, x[i:i + bs]), np.float32)
                             for i in range(0, len(x), bs)])

  def logits(self, images) -> np.ndarray:
    """(B, N) float32 logits, column j for ``labels[j]``."""
    f = jnp.asarray(self.features(images))
    return np.asarray(inner_lib.linear_head(self.head, f), np.float32)

  def predict_proba(self, images) -> np.ndarray:
    return np.asarray(jax.nn.softmax(self.logits(images), axis=-1))

  def predict(self, images) -> np.ndarray:
    """(B,) predicted labels, in the terms of the support labels (names or integers)."""
    return np.asarray(self.labels)[np.argmax(self.logits(images), axis=-1)]

  def __repr__(self):
    return (f"FewShotClassifier(method={self.method!r}, classes={len(self.labels)}, "
            f"tower={'adapted' if self.backbone is not None else 'frozen'})")


def _precision(model):
  p = getattr(model, "precision", None)
  return jax.default_matmul_precision(p) if p else contextlib.nullcontext()


def _support(method, support_images, support_labels, class_names):
  """``(ys, labels, names)`` of the support set, or a `FewShotError` naming what is missing."""
  if method not in METHODS:
    raise FewShotError(f"method={method!r} is unknown; use one of {METHODS}")
  if method in NEEDS_NAMES and class_names is None and (
      support_labels is None or not len(support_labels)
      or not isinstance(list(support_labels)[0], str)):
    raise FewShotError(f"method={method!r} starts from the text tower: pass class_names=[...] "
                       "(or label the images with class names)")
  if method == "zeroshot" and support_images is None:
    names = [str(n) for n in class_names]
    ys, labels = None, list(range(len(names)))
  else:
    if support_images is None:
      raise FewShotError(f"method={method!r} needs support images; only 'zeroshot' works without")
    ys, labels, names = _labels(support_labels, class_names)
    if class_names is None and names is None and method != "protonet":
      raise FewShotError(f"method={method!r} needs class_names")
  return ys, labels, names


def few_shot(model, support_images, support_labels, *, class_names: Sequence[str] | None = None,
             method: str = "zs_head_adapt", steps: int | None = None, lr: float | None = None,
             alpha: float = 0.5, blocks: int | None = None,
             templates: Sequence[str] | None = None,
             proto_weight: float | None = None) -> FewShotClassifier:
  """Adapts `model` (a `fszjax.inference.Model`) to the support set.

  Args:
    support_images: the labelled images (None for ``method="zeroshot"``).
    support_labels: one label per image: class names, or integers (indices into
      `class_names` when given, else any values).
    class_names: the text of each class (needed by every method but protonet).
    method: one of `METHODS`.
    steps / lr: SGD steps and step size (defaults in `DEFAULTS`).
    alpha: WiSE-FT mixing weight of the adapted weights.
    blocks: image-tower blocks fine-tuned (finetune: default 1; wise_ft: default 0, the
      head only).
    templates: prompt templates for the class names (default: the model config's).
    proto_weight: proto_zs's share of the prototypes (1 = ProtoNets, 0 = the names), fixed
      for every class; None = chosen on the support set (see the module doc).
  """
  ys, labels, names = _support(method, support_images, support_labels, class_names)
  n_way = len(labels)
  scale = float(model.logit_scale)
  bias = float(model.logit_bias or 0.0)
  text = None
  if method != "protonet":
    text = jnp.asarray(model.zero_shot_classifier(names, templates))
  d_steps, d_lr = DEFAULTS.get(method, (0, 0.0))
  steps = d_steps if steps is None else int(steps)
  lr = d_lr if lr is None else float(lr)
  blocks = (1 if method == "finetune" else 0) if blocks is None else int(blocks)
  if method == "finetune" and blocks < 1:
    raise FewShotError("method='finetune' needs blocks >= 1; for the head alone use "
                       "'zs_head_adapt'")
  if method == "wise_ft" and not 0.0 <= alpha <= 1.0:
    raise FewShotError(f"alpha={alpha} must be in [0, 1]")
  head0 = None if text is None else inner_lib.zeroshot_head(text, scale, bias)
  make = lambda head, backbone=None: FewShotClassifier(model, method, head, labels,
                                                        names, backbone)
  if method == "zeroshot":
    return make(head0)
  ys = jnp.asarray(ys)
  if method == "protonet":
    # ProtoNets' classifier as a linear head: -|f - c|^2 up to a per-row constant.
    return make(inner_lib.prototype_head(jnp.asarray(model.encode_image(support_images)), ys, n_way))
  if method == "proto_zs":
    return make(_proto_zs_head(model, support_images, ys, text, n_way, steps, lr,
                               proto_weight, scale, bias))
  if method == "zs_head_adapt" or (method == "wise_ft" and blocks == 0):
    cfg = meta_lib.MetaConfig(algorithm="anil", n_way=n_way, inner_steps=steps, inner_lr=lr,
                              adapt="head", head_init="zeroshot", logit_scale=scale,
                              logit_bias=bias)
    fit = _cached(model, ("head", cfg), lambda: jax.jit(
        lambda fs, y, t: meta_lib.adapt(_identity, cfg, {"backbone": None, "head": None},
                                        {"support_x": fs, "support_y": y, "text_emb": t})[0]["head"]))
    fs = jnp.asarray(model.encode_image(support_images))
    head = fit(fs, ys, text)
    if method == "wise_ft":
      head = dg_lib.wise_ft(head0, head, alpha)
    return make(head)
  # finetune / wise_ft of the last `blocks` blocks + the zero-shot head, on pixels.
  head, backbone = _finetune_blocks(model, method, support_images, ys, text, head0, n_way,
                                    steps, lr, blocks, alpha, scale, bias)
  return make(head, backbone)


def _finetune_blocks(model, method, support_images, ys, text, head0, n_way, steps, lr, blocks,
                     alpha, scale, bias):
  """(head, image-tower params) after fine-tuning the last `blocks` blocks and the zero-shot
  head on the support pixels (WiSE-FT-mixed with the start for ``method='wise_ft'``)."""
  cfg = meta_lib.MetaConfig(algorithm="fomaml", n_way=n_way, inner_steps=steps, inner_lr=lr,
                            adapt=blocks, head_init="zeroshot", logit_scale=scale,
                            logit_bias=bias)
  backbone0 = model.params["img"]
  try:
    inner_lib.adapt_mask({"backbone": backbone0, "head": head0}, blocks)
  except ValueError as e:
    raise FewShotError(f"blocks={blocks}: {e}; models saved with scan_layers=True cannot "
                       "fine-tune single blocks (use zs_head_adapt)") from None

  def build():
    features = _tower_features(model)
    return jax.jit(lambda bb, x, y, t: meta_lib.adapt(
        features, cfg, {"backbone": bb, "head": None},
        {"support_x": x, "support_y": y, "text_emb": t})[0])

  fit = _cached(model, ("finetune", cfg), build)
  with _precision(model):
    adapted = fit(backbone0, jnp.asarray(model.image_batch(support_images)), ys, text)
  if method == "wise_ft":
    adapted = dg_lib.wise_ft({"backbone": backbone0, "head": head0}, adapted, alpha)
  return adapted["head"], adapted["backbone"]


def _proto_zs_head(model, support_images, ys, text, n_way, steps, lr, proto_weight, scale,
                   bias):
  """The head of method 'proto_zs' (`transfer.proto_zeroshot_fit` on the support features)."""
  if proto_weight is not None and not 0.0 <= float(proto_weight) <= 1.0:
    raise FewShotError(f"proto_weight={proto_weight} must be in [0, 1] (or None: chosen on the "
                       "support set)")
  shots = int(np.min(np.bincount(np.asarray(ys), minlength=n_way)))
  if shots < 1:
    raise FewShotError("method='proto_zs' needs at least one image of every class")
  cv = PROTO_ZS_WEIGHTS if proto_weight is None and shots >= 2 else None
  gate = proto_weight is None
  weight = 0.5 if proto_weight is None else float(proto_weight)
  fit = _cached(model, ("proto_zs", n_way, steps, gate, cv), lambda: jax.jit(
      lambda fs, y, t, w, step: transfer.proto_zeroshot_fit(
          fs, y, t, n_way, scale, bias, w, steps, step, gate, cv)))
  fs = jnp.asarray(model.encode_image(support_images))
  return fit(fs, ys, text, jnp.float32(weight), jnp.float32(lr))

