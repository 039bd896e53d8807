"""Few-shot baselines without meta-training, one task at a time (vmap / `evaluate_tasks`).

- `linear_probe`: a linear head trained on frozen support features (full-batch GD).
- `finetune`: SGD on the support set of the whole model (or a masked part of it).
- `nearest_prototype`: classify query features by the nearest support class mean
  (Euclidean or cosine); with `pixel_features` it runs on raw pixels.

Each returns query metrics ``{'loss', 'acc'}`` of one task (dict of the
`fszjax.data.episodes` layout without the task axis).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fszjax.fewshot import inner as inner_lib
from fszjax.fewshot import meta as meta_lib
from fszjax.fewshot.inner import FeaturesFn, Params, accuracy, cross_entropy, linear_head


def pixel_features(_: Any, x: jax.Array) -> jax.Array:
  """Raw pixels as features: (B, ...) -> (B, prod(...)); ignores its params."""
  return x.reshape(x.shape[0], -1).astype(jnp.float32)


def _metrics(logits, labels):
  return {"loss": cross_entropy(logits, labels), "acc": accuracy(logits, labels)}


def linear_probe(features_fn: FeaturesFn, backbone: Params, task: dict, *, n_way: int,
                 steps: int = 100, lr: float = 0.5, l2: float = 0.0,
                 head_init: str = "zeros", normalize: bool = False) -> dict:
  """Linear head on frozen features: `steps` of full-batch GD on support cross-entropy (+ l2).

  head_init: 'zeros' or 'prototype'. normalize: L2-normalise features first.
  """
  feats = jax.lax.stop_gradient(features_fn(backbone, task["support_x"]))
  fq = jax.lax.stop_gradient(features_fn(backbone, task["query_x"]))
  if normalize:
    feats, fq = inner_lib.l2_normalize(feats), inner_lib.l2_normalize(fq)
  ys = task["support_y"]
  if head_init == "zeros":
    head0 = inner_lib.zeros_head(feats.shape[-1], n_way, feats.dtype)
  elif head_init == "prototype":
    head0 = inner_lib.prototype_head(feats, ys, n_way)
  else:
    raise ValueError(f"linear_probe head_init={head_init!r}: use 'zeros' or 'prototype'")

  def loss(h):
    return cross_entropy(linear_head(h, feats), ys) + 0.5 * l2 * jnp.sum(jnp.square(h["w"]))

  head, _ = inner_lib.inner_loop(loss, head0, steps=steps, lr=lr, first_order=True)
  return _metrics(linear_head(head, fq), task["query_y"])


def finetune(features_fn: FeaturesFn, params: Params, task: dict, *, n_way: int,
             steps: int = 50, lr: float = 0.01, adapt: Any = "all",
             head_init: str = "prototype", logit_scale: float = 1.0) -> dict:
  """Fine-tunes ``{'backbone', 'head'}`` params on the support set with `steps` SGD steps.

  head_init: 'learned' (keep params['head']), 'zeros', 'prototype' or 'zeroshot'
  (task['text_emb'] with `logit_scale`). adapt: what is trained (`inner.adapt_mask`).
  """
  cfg = meta_lib.MetaConfig(algorithm="fomaml", n_way=n_way, inner_steps=steps, inner_lr=lr,
                            adapt=adapt, head_init=head_init,
                            logit_scale=logit_scale)
  adapted, _ = meta_lib.adapt(features_fn, cfg, jax.lax.stop_gradient(params), task)
  return _metrics(inner_lib.apply_model(features_fn, adapted, task["query_x"]), task["query_y"])


def nearest_prototype(features_fn: FeaturesFn, backbone: Params, task: dict, *, n_way: int,
                      metric: str = "euclidean") -> dict:
  """Nearest class mean of support features ('euclidean' or 'cosine')."""
  fs = features_fn(backbone, task["support_x"])
  fq = features_fn(backbone, task["query_x"])
  if metric == "cosine":
    fs, fq = inner_lib.l2_normalize(fs), inner_lib.l2_normalize(fq)
    c = inner_lib.l2_normalize(inner_lib.prototypes(fs, task["support_y"], n_way))
    logits = fq @ c.T
  elif metric == "euclidean":
    logits = meta_lib.proto_logits(features_fn, backbone, task, n_way)
  else:
    raise ValueError(f"nearest_prototype metric={metric!r}: use 'euclidean' or 'cosine'")
  return _metrics(logits, task["query_y"])


def evaluate_tasks(fn: Callable[[dict], dict], tasks: dict, chunk: int = 0) -> dict:
  """Mean of ``fn(task)`` metrics over a meta-batch (leading task axis), jitted.

  Example: ``evaluate_tasks(lambda t: nearest_prototype(pixel_features, None, t, n_way=5), tasks)``.
  """
  return jax.jit(lambda t: meta_lib.mean_over_tasks(fn, t, chunk))(tasks)
