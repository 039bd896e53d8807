"""Meta-learners as pure functions: MAML, FOMAML, Reptile, ANIL, Meta-SGD, ProtoNets.

One task is a dict (as from `fszjax.data.episodes`)::

  support_x (S, ...), support_y (S,) in 0..N-1, query_x (Q, ...), query_y (Q,)
  [text_emb (N, D)]   class text embeddings, for ``head_init='zeroshot'``

and a meta-batch is the same dict with a leading task axis T. The per-task objective
(`task_loss`) runs the `lax.scan` inner loop of `fszjax.fewshot.inner` on the support set
and returns the query loss of the adapted model; `meta_loss` averages it over the
meta-batch with `vmap`, and `jax.value_and_grad` of that is the meta-gradient
(second order for MAML/Meta-SGD/ANIL, first order for FOMAML). Reptile has no meta-loss:
its "gradient" is ``-(mean over tasks of adapted - initial)`` so that SGD with step size
epsilon applies Reptile's update. `make_meta_step` jits one optimizer step with the task
axis sharded over the mesh's batch axes.

Meta-parameters are ``{'backbone', 'head'}`` params, except for Meta-SGD:
``{'params': params, 'inner_lr': pytree like params}`` (see `init_meta_params`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fszjax.fewshot import inner as inner_lib
from fszjax.fewshot.inner import (FeaturesFn, Params, accuracy, cross_entropy, linear_head)

ALGORITHMS = ("maml", "fomaml", "reptile", "anil", "metasgd", "protonet")


@dataclasses.dataclass(frozen=True)
class MetaConfig:
  """Hyper-parameters of a meta-learner.

  algorithm: one of `ALGORITHMS`.
  n_way: classes per task (the head's width for ``head_init != 'learned'``).
  inner_steps / inner_lr: inner SGD steps on the support set and their step size
    (Meta-SGD: the initial value of its learned per-parameter step sizes).
  adapt: what the inner loop adapts (`inner.adapt_mask`): 'all', 'head', int k, predicate.
    ANIL always adapts the head only.
  first_order: drop second-order terms (implied by 'fomaml'; optional for anil/metasgd).
  remat: checkpoint each inner step (memory bounded in inner_steps).
  head_init: 'learned' (meta-learned head), 'zeros', 'prototype' (from support features),
    or 'zeroshot' (from the task's ``text_emb`` (N, D) and `logit_scale`).
  logit_scale / logit_bias: for 'zeroshot'.
  eval_inner_steps: inner steps at evaluation (default: inner_steps).
  """

  algorithm: str = "maml"
  n_way: int = 5
  inner_steps: int = 5
  inner_lr: float = 0.4
  adapt: Any = "all"
  first_order: bool = False
  remat: bool = False
  unroll: int | bool = 1
  head_init: str = "learned"
  logit_scale: float = 1.0
  logit_bias: float = 0.0
  eval_inner_steps: int | None = None

  def __post_init__(self):
    if self.algorithm not in ALGORITHMS:
      raise ValueError(f"algorithm={self.algorithm!r} is not one of {ALGORITHMS}")
    if self.head_init not in inner_lib.HEAD_INITS:
      raise ValueError(f"head_init={self.head_init!r} is not one of {inner_lib.HEAD_INITS}")
    if self.inner_steps < 0:
      raise ValueError(f"inner_steps={self.inner_steps} must be >= 0")


def init_meta_params(cfg: MetaConfig, params: Params) -> Params:
  """Meta-parameters: params, or for Meta-SGD ``{'params', 'inner_lr'}`` (lr = cfg.inner_lr)."""
  if cfg.algorithm == "metasgd":
    return {"params": params,
            "inner_lr": jax.tree.map(lambda p: jnp.full_like(p, cfg.inner_lr), params)}
  return params


def model_params(cfg: MetaConfig, meta_params: Params) -> Params:
  """The ``{'backbone', 'head'}`` params inside meta-parameters."""
  return meta_params["params"] if cfg.algorithm == "metasgd" else meta_params


def task_head(cfg: MetaConfig, params: Params, support_feats: jax.Array | None,
              task: dict) -> dict:
  """The head a task starts adapting from (cfg.head_init; differentiable in params)."""
  if cfg.head_init == "learned":
    return params["head"]
  if cfg.head_init == "zeros":
    d = support_feats.shape[-1]
    return inner_lib.zeros_head(d, cfg.n_way, support_feats.dtype)
  if cfg.head_init == "prototype":
    return inner_lib.prototype_head(support_feats, task["support_y"], cfg.n_way)
  if "text_emb" not in task:
    raise ValueError("head_init='zeroshot' needs task['text_emb'] (N, D): class text embeddings")
  return inner_lib.zeroshot_head(task["text_emb"], cfg.logit_scale, cfg.logit_bias)


def adapt(features_fn: FeaturesFn, cfg: MetaConfig, meta_params: Params, task: dict, *,
          steps: int | None = None) -> tuple[Params, jax.Array]:
  """Adapts meta-parameters to one task's support set.

  Returns ``(adapted {'backbone', 'head'} params, support losses (steps,))``. For ANIL the
  backbone is unchanged (its support features are computed once, not per step).
  """
  steps = cfg.inner_steps if steps is None else steps
  params = model_params(cfg, meta_params)
  xs, ys = task["support_x"], task["support_y"]
  if cfg.algorithm == "anil":
    feats = features_fn(params["backbone"], xs)
    head0 = task_head(cfg, params, feats, task)
    head, losses = inner_lib.inner_loop(
        lambda h: cross_entropy(linear_head(h, feats), ys), head0, steps=steps,
        lr=cfg.inner_lr, first_order=cfg.first_order, remat=cfg.remat,
        unroll=cfg.unroll)
    return {"backbone": params["backbone"], "head": head}, losses
  if cfg.head_init != "learned":
    feats = None
    if cfg.head_init in ("zeros", "prototype"):
      feats = features_fn(params["backbone"], xs)
    params = {"backbone": params["backbone"], "head": task_head(cfg, params, feats, task)}
  mask = inner_lib.adapt_mask(params, cfg.adapt)
  lr = cfg.inner_lr
  if cfg.algorithm == "metasgd":
    lr = meta_params["inner_lr"]
  first_order = cfg.first_order or cfg.algorithm in ("fomaml", "reptile")
  loss_fn = lambda p: cross_entropy(inner_lib.apply_model(features_fn, p, xs), ys)
  return inner_lib.inner_loop(loss_fn, params, steps=steps, lr=lr, mask=mask,
                              first_order=first_order, remat=cfg.remat,
                              unroll=cfg.unroll)


def _proto_logits(features_fn, params, task, n_way):
  fs = features_fn(params["backbone"], task["support_x"])
  fq = features_fn(params["backbone"], task["query_x"])
  c = inner_lib.prototypes(fs, task["support_y"], n_way)
  return -(jnp.sum(fq * fq, -1, keepdims=True) - 2 * fq @ c.T + jnp.sum(c * c, -1))


def task_loss(meta_params: Params, task: dict, *, features_fn: FeaturesFn,
              cfg: MetaConfig) -> tuple[jax.Array, dict]:
  """Query loss of one task after adaptation, and metrics {'loss', 'acc', 'support_loss'}.

  ProtoNets: cross-entropy of negative squared distances to the support prototypes.
  """
  if cfg.algorithm == "protonet":
    logits = _proto_logits(features_fn, meta_params, task, cfg.n_way)
    loss = cross_entropy(logits, task["query_y"])
    return loss, {"loss": loss, "acc": accuracy(logits, task["query_y"])}
  adapted, losses = adapt(features_fn, cfg, meta_params, task)
  logits = inner_lib.apply_model(features_fn, adapted, task["query_x"])
  loss = cross_entropy(logits, task["query_y"])
  metrics = {"loss": loss, "acc": accuracy(logits, task["query_y"])}
  if losses.shape[0]:
    metrics["support_loss"] = losses[0]
  return loss, metrics


def meta_loss(meta_params: Params, tasks: dict, *, features_fn: FeaturesFn,
              cfg: MetaConfig) -> tuple[jax.Array, dict]:
  """Mean `task_loss` over a meta-batch (leading task axis T), vmapped; metrics are means."""
  losses, metrics = jax.vmap(
      lambda t: task_loss(meta_params, t, features_fn=features_fn, cfg=cfg))(tasks)
  return jnp.mean(losses), jax.tree.map(jnp.mean, metrics)


def reptile_direction(params: Params, tasks: dict, *, features_fn: FeaturesFn,
                      cfg: MetaConfig) -> tuple[Params, dict]:
  """Mean over tasks of (adapted - initial) params (T tasks vmapped), and metrics.

  Reptile's update is ``params + epsilon * direction``.
  """

  def one(task):
    adapted, losses = adapt(features_fn, cfg, params, task)
    logits = inner_lib.apply_model(features_fn, adapted, task["query_x"])
    delta = jax.tree.map(lambda a, p: a - p, adapted, params)
    return delta, {"loss": cross_entropy(logits, task["query_y"]),
                   "acc": accuracy(logits, task["query_y"])}

  deltas, metrics = jax.vmap(one)(tasks)
  return jax.tree.map(lambda d: jnp.mean(d, 0), deltas), jax.tree.map(jnp.mean, metrics)


def reptile_update(params: Params, tasks: dict, step_size: float, *,
                   features_fn: FeaturesFn, cfg: MetaConfig) -> Params:
  """Reptile: ``params + step_size * mean_t(adapted_t - params)``."""
  direction, _ = reptile_direction(params, tasks, features_fn=features_fn, cfg=cfg)
  return jax.tree.map(lambda p, d: p + step_size * d, params, direction)


def meta_grad(meta_params: Params, tasks: dict, *, features_fn: FeaturesFn,
              cfg: MetaConfig) -> tuple[Params, dict]:
  """(meta-gradient, metrics) of a meta-batch; for Reptile the negated Reptile direction."""
  if cfg.algorithm == "reptile":
    direction, metrics = reptile_direction(meta_params, tasks, features_fn=features_fn, cfg=cfg)
    return jax.tree.map(jnp.negative, direction), metrics
  (_, metrics), grads = jax.value_and_grad(meta_loss, has_aux=True)(
      meta_params, tasks, features_fn=features_fn, cfg=cfg)
  return grads, metrics


def evaluate(meta_params: Params, tasks: dict, *, features_fn: FeaturesFn,
             cfg: MetaConfig) -> dict:
  """Mean query {'loss', 'acc'} over tasks after `cfg.eval_inner_steps` inner steps."""
  steps = cfg.inner_steps if cfg.eval_inner_steps is None else cfg.eval_inner_steps
  ecfg = dataclasses.replace(cfg, inner_steps=steps)
  if cfg.algorithm == "reptile":
    ecfg = dataclasses.replace(ecfg, algorithm="fomaml")
  _, metrics = meta_loss(jax.lax.stop_gradient(meta_params), tasks, features_fn=features_fn,
                         cfg=ecfg)
  return metrics


def task_shardings(mesh, tasks: dict):
  """NamedShardings putting each task array's leading (task) axis on the mesh batch axes."""
  from fszjax import sharding as shd

  return jax.tree.map(lambda x: shd.batch_sharding(mesh, x.ndim), tasks)


def make_meta_step(features_fn: FeaturesFn, cfg: MetaConfig, optimizer, *, mesh=None,
                   donate: bool = True) -> Callable:
  """A jitted ``step(meta_params, opt_state, tasks) -> (meta_params, opt_state, metrics)``.

  `optimizer` is an optax GradientTransformation (for Reptile use ``optax.sgd(epsilon)``).
  With a mesh, tasks are sharded over its batch axes (``data``, ``fsdp``) on the task axis
  and parameters replicated; T must be a multiple of the batch-axes size.
  """
  import optax

  def step(meta_params, opt_state, tasks):
    if mesh is not None:
      tasks = jax.lax.with_sharding_constraint(tasks, task_shardings(mesh, tasks))
    grads, metrics = meta_grad(meta_params, tasks, features_fn=features_fn, cfg=cfg)
    updates, opt_state = optimizer.update(grads, opt_state, meta_params)
    return optax.apply_updates(meta_params, updates), opt_state, metrics

  kwargs = {"donate_argnums": (0, 1)} if donate else {}
  if mesh is None:
    return jax.jit(step, **kwargs)
  from fszjax import sharding as shd

  rep = shd.replicated(mesh)

  def sharded_step(meta_params, opt_state, tasks):
    from fszjax import sharding as shd2

    n = shd2.batch_size_per_shard(mesh)
    t = jax.tree.leaves(tasks)[0].shape[0]
    if t % n:
      raise ValueError(f"meta_batch={t} is not divisible by the mesh batch axes size {n}; "
                       f"use a multiple of {n}")
    return jitted(meta_params, opt_state, tasks)

  jitted = jax.jit(step, out_shardings=(rep, rep, rep), **kwargs)
  return sharded_step
