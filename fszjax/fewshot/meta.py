"""Meta-learners as pure functions: MAML, FOMAML, Reptile, ANIL, Meta-SGD, ProtoNets.

One task is a dict (as from `fszjax.data.episodes`)::

  support_x (S, ...), support_y (S,) in 0..N-1, query_x (Q, ...), query_y (Q,)
  [text_emb (N, D)]   class text embeddings, for ``head_init='zeroshot'``

and a meta-batch is the same dict with a leading task axis T. `task_loss` runs the
`lax.scan` inner loop of `fszjax.fewshot.inner` on the support set and returns the query
loss of the adapted model; `task_grad` is its `jax.value_and_grad` (second order for
MAML / Meta-SGD / ANIL, first order for FOMAML); `meta_grad` averages it over the
meta-batch. Reptile has no meta-loss: its "gradient" is ``-(adapted - initial)`` so that SGD
with step size epsilon applies Reptile's update.

Batching the meta-batch (`MetaConfig.task_chunk`): ``0`` vmaps all T tasks at once;
``c > 0`` vmaps c tasks at a time inside a `lax.scan` over T / c chunks that sums their
gradients (``c = 1``: one unbatched task per scan step). Chunks keep a task's activations
in cache: for Conv-4 MAML on a 2-core CPU, chunks of 4 ran about twice as fast as one
32-task vmap (see `fszjax.fewshot.bench`); on accelerators use 0 (or a large chunk) to
fill the device.

`make_meta_step` jits one optimizer step. With a mesh, the task axis is sharded over the
mesh's batch axes (``data``, ``fsdp``): inputs carry a `NamedSharding` on the task axis,
each device reduces its own tasks inside `jax.shard_map`, and a `pmean` averages the
gradients.

Meta-parameters are ``{'backbone', 'head'}`` params, except for Meta-SGD:
``{'params': params, 'inner_lr': pytree like params}`` (see `init_meta_params`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from fszjax import sharding as shd
from fszjax.fewshot import inner as inner_lib
from fszjax.fewshot.inner import FeaturesFn, Params, accuracy, cross_entropy, linear_head

ALGORITHMS = ("maml", "fomaml", "reptile", "anil", "metasgd", "protonet")


@dataclasses.dataclass(frozen=True)
class MetaConfig:
  """Hyper-parameters of a meta-learner.

  algorithm: one of `ALGORITHMS`.
  n_way: classes per task (the head's width for ``head_init != 'learned'``).
  inner_steps / inner_lr: inner SGD steps on the support set and their step size
    (Meta-SGD: the initial value of its learned per-parameter step sizes).
  adapt: what the inner loop adapts (`inner.adapt_mask`): 'all', 'head', int k (last k
    blocks + head), a predicate on parameter paths, or a mask. ANIL adapts the head only.
  first_order: drop second-order terms (implied by 'fomaml' and 'reptile').
  remat: `jax.checkpoint` each inner step (memory bounded in inner_steps).
  unroll: `lax.scan` unroll of the inner loop.
  head_init: 'learned' (meta-learned head), 'zeros', 'prototype' (from support features),
    or 'zeroshot' (from the task's ``text_emb`` (N, D), `logit_scale`, `logit_bias`).
  eval_inner_steps: inner steps at evaluation (default: inner_steps).
  eval_inner_lr: inner step size at evaluation (default: inner_lr; Meta-SGD uses its
    learned step sizes).
  task_chunk: tasks vmapped together (0: all of a device's tasks; see module doc).
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
  eval_inner_lr: float | None = None
  task_chunk: int = 0

  def __post_init__(self):
    if self.algorithm not in ALGORITHMS:
      raise ValueError(f"algorithm={self.algorithm!r} is not one of {ALGORITHMS}")
    if self.head_init not in inner_lib.HEAD_INITS:
      raise ValueError(f"head_init={self.head_init!r} is not one of {inner_lib.HEAD_INITS}")
    if self.inner_steps < 0:
      raise ValueError(f"inner_steps={self.inner_steps} must be >= 0")
    if self.task_chunk < 0:
      raise ValueError(f"task_chunk={self.task_chunk} must be >= 0 (0 = vmap all tasks)")

  def for_eval(self) -> "MetaConfig":
    """The config that evaluation adapts with: eval_inner_steps / eval_inner_lr in place of
    inner_steps / inner_lr; Reptile adapts like FOMAML (it has no query loss of its own)."""
    return dataclasses.replace(
        self, inner_steps=self.inner_steps if self.eval_inner_steps is None else self.eval_inner_steps,
        inner_lr=self.inner_lr if self.eval_inner_lr is None else self.eval_inner_lr,
        algorithm="fomaml" if self.algorithm == "reptile" else self.algorithm)


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
    return inner_lib.zeros_head(support_feats.shape[-1], cfg.n_way, support_feats.dtype)
  if cfg.head_init == "prototype":
    return inner_lib.prototype_head(support_feats, task["support_y"], cfg.n_way)
  if "text_emb" not in task:
    raise ValueError("head_init='zeroshot' needs task['text_emb'] (N, D): class text embeddings")
  return inner_lib.zeroshot_head(task["text_emb"], cfg.logit_scale, cfg.logit_bias)


def adapt(features_fn: FeaturesFn, cfg: MetaConfig, meta_params: Params, task: dict, *,
          steps: int | None = None) -> tuple[Params, jax.Array]:
  """Adapts meta-parameters to one task's support set.

  Returns ``(adapted {'backbone', 'head'} params, support losses (steps,))``. For ANIL the
  backbone is unchanged and its support features are computed once, not once per step.
  """
  steps = cfg.inner_steps if steps is None else steps
  params = model_params(cfg, meta_params)
  xs, ys = task["support_x"], task["support_y"]
  if cfg.algorithm == "anil":
    feats = features_fn(params["backbone"], xs)
    head0 = task_head(cfg, params, feats, task)
    head, losses = inner_lib.inner_loop(
        lambda h: cross_entropy(linear_head(h, feats), ys), head0, steps=steps,
        lr=cfg.inner_lr, first_order=cfg.first_order, remat=cfg.remat, unroll=cfg.unroll)
    return {"backbone": params["backbone"], "head": head}, losses
  if cfg.head_init != "learned":
    feats = None
    if cfg.head_init in ("zeros", "prototype"):
      feats = features_fn(params["backbone"], xs)
    params = {"backbone": params["backbone"], "head": task_head(cfg, params, feats, task)}
  mask = inner_lib.adapt_mask(params, cfg.adapt)
  lr = meta_params["inner_lr"] if cfg.algorithm == "metasgd" else cfg.inner_lr
  first_order = cfg.first_order or cfg.algorithm in ("fomaml", "reptile")
  loss_fn = lambda p: cross_entropy(inner_lib.apply_model(features_fn, p, xs), ys)
  return inner_lib.inner_loop(loss_fn, params, steps=steps, lr=lr, mask=mask,
                              first_order=first_order, remat=cfg.remat, unroll=cfg.unroll)


def proto_logits(features_fn: FeaturesFn, backbone: Params, task: dict,
                 n_way: int) -> jax.Array:
  """ProtoNets logits (Q, N): minus squared distances of query features to class means."""
  fs = features_fn(backbone, task["support_x"])
  fq = features_fn(backbone, task["query_x"])
  chex.assert_rank([fs, fq], 2)  # (S, D) support and (Q, D) query features
  chex.assert_equal_shape_suffix([fs, fq], 1)
  c = inner_lib.prototypes(fs, task["support_y"], n_way)
  return -(jnp.sum(fq * fq, -1, keepdims=True) - 2.0 * fq @ c.T + jnp.sum(c * c, -1))


def task_loss(meta_params: Params, task: dict, *, features_fn: FeaturesFn,
              cfg: MetaConfig) -> tuple[jax.Array, dict]:
  """Query loss of one task after adaptation, and metrics {'loss', 'acc'[, 'support_loss']}.

  ProtoNets: cross-entropy of negative squared distances to the support prototypes.
  """
  if cfg.algorithm == "protonet":
    logits = proto_logits(features_fn, meta_params["backbone"], task, cfg.n_way)
    loss = cross_entropy(logits, task["query_y"])
    return loss, {"loss": loss, "acc": accuracy(logits, task["query_y"])}
  adapted, losses = adapt(features_fn, cfg, meta_params, task)
  logits = inner_lib.apply_model(features_fn, adapted, task["query_x"])
  loss = cross_entropy(logits, task["query_y"])
  metrics = {"loss": loss, "acc": accuracy(logits, task["query_y"])}
  if losses.shape[0]:
    metrics["support_loss"] = losses[0]
  return loss, metrics


def task_grad(meta_params: Params, task: dict, *, features_fn: FeaturesFn,
              cfg: MetaConfig) -> tuple[Params, dict]:
  """(meta-gradient, metrics) of one task. Reptile: ``params - adapted`` (minus its direction)."""
  if cfg.algorithm == "reptile":
    adapted, _ = adapt(features_fn, cfg, meta_params, task)
    logits = inner_lib.apply_model(features_fn, adapted, task["query_x"])
    metrics = {"loss": cross_entropy(logits, task["query_y"]),
               "acc": accuracy(logits, task["query_y"])}
    return jax.tree.map(lambda p, a: p - a, meta_params, adapted), metrics
  (_, metrics), grads = jax.value_and_grad(task_loss, has_aux=True)(
      meta_params, task, features_fn=features_fn, cfg=cfg)
  return grads, metrics


def _num_tasks(tasks: dict) -> int:
  return jax.tree.leaves(tasks)[0].shape[0]


def mean_over_tasks(fn: Callable[[dict], Any], tasks: dict, chunk: int = 0) -> Any:
  """Mean over the leading task axis of ``fn(task)`` (a pytree of arrays).

  chunk 0: one `vmap` over all tasks. chunk c: a `lax.scan` over T / c chunks, each a
  `vmap` over c tasks, summing as it goes (per-task outputs are never all stored).
  """
  t = _num_tasks(tasks)
  if chunk <= 0 or chunk >= t:
    return jax.tree.map(lambda x: jnp.mean(x, 0), jax.vmap(fn)(tasks))
  if t % chunk:
    raise ValueError(f"meta-batch of {t} tasks (per device) is not divisible by "
                     f"task_chunk={chunk}; use a divisor of {t}")
  chunks = jax.tree.map(lambda x: x.reshape((t // chunk, chunk) + x.shape[1:]), tasks)
  if chunk == 1:  # one task per scan step, not vmapped: plain (unbatched) matmuls
    chunks = jax.tree.map(lambda x: x[:, 0], chunks)
    chunk_sum = fn
  else:
    chunk_sum = lambda c: jax.tree.map(lambda y: jnp.sum(y, 0), jax.vmap(fn)(c))
  out_shape = jax.eval_shape(chunk_sum, jax.tree.map(lambda x: x[0], chunks))
  init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)

  def body(acc, c):
    return jax.tree.map(jnp.add, acc, chunk_sum(c)), None

  total, _ = jax.lax.scan(body, init, chunks)
  return jax.tree.map(lambda x: x / t, total)


def meta_grad(meta_params: Params, tasks: dict, *, features_fn: FeaturesFn,
              cfg: MetaConfig) -> tuple[Params, dict]:
  """(mean meta-gradient, mean metrics) over a meta-batch (leading task axis T)."""
  if cfg.task_chunk == 0 and cfg.algorithm != "reptile":
    # One vmapped loss: no per-task gradient copies.
    def loss(p):
      losses, metrics = jax.vmap(lambda t: task_loss(p, t, features_fn=features_fn, cfg=cfg))(tasks)
      return jnp.mean(losses), jax.tree.map(jnp.mean, metrics)

    (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(meta_params)
    return grads, metrics
  return mean_over_tasks(
      lambda t: task_grad(meta_params, t, features_fn=features_fn, cfg=cfg), tasks,
      cfg.task_chunk)


def meta_loss(meta_params: Params, tasks: dict, *, features_fn: FeaturesFn,
              cfg: MetaConfig) -> tuple[jax.Array, dict]:
  """Mean `task_loss` over a meta-batch (vmapped); metrics are means over tasks."""
  losses, metrics = jax.vmap(
      lambda t: task_loss(meta_params, t, features_fn=features_fn, cfg=cfg))(tasks)
  return jnp.mean(losses), jax.tree.map(jnp.mean, metrics)


def reptile_update(params: Params, tasks: dict, step_size: float, *,
                   features_fn: FeaturesFn, cfg: MetaConfig) -> Params:
  """Reptile: ``params + step_size * mean_t(adapted_t - params)``."""
  neg_dir, _ = meta_grad(params, tasks, features_fn=features_fn, cfg=cfg)
  return jax.tree.map(lambda p, d: p - step_size * d, params, neg_dir)


def evaluate(meta_params: Params, tasks: dict, *, features_fn: FeaturesFn,
             cfg: MetaConfig) -> dict:
  """Mean query {'loss', 'acc'} over tasks after adapting with `MetaConfig.for_eval`."""
  ecfg = cfg.for_eval()
  meta_params = jax.lax.stop_gradient(meta_params)
  return mean_over_tasks(
      lambda t: task_loss(meta_params, t, features_fn=features_fn, cfg=ecfg)[1], tasks,
      cfg.task_chunk)


def task_shardings(mesh, tasks: dict):
  """NamedShardings putting each task array's leading (task) axis on the mesh batch axes."""
  return jax.tree.map(lambda x: shd.batch_sharding(mesh, jnp.ndim(x)), tasks)


def sharded_meta_grad(meta_params: Params, tasks: dict, *, features_fn: FeaturesFn,
                      cfg: MetaConfig, mesh) -> tuple[Params, dict]:
  """`meta_grad` with the task axis split over the mesh batch axes (`jax.shard_map`).

  Each device reduces its T / devices tasks (chunked by cfg.task_chunk); a `pmean` over
  the batch axes gives every device the global mean. Call inside `jax.jit`.
  """
  n = shd.data_parallel_size(mesh)
  t = _num_tasks(tasks)
  if t % n:
    raise ValueError(f"meta_batch={t} is not divisible by the mesh batch axes size {n} "
                     f"(data x fsdp); use a multiple of {n}")

  def local(p, tk):
    g, m = meta_grad(p, tk, features_fn=features_fn, cfg=cfg)
    return jax.lax.pmean((g, m), shd.BATCH_AXES)

  task_spec = jax.tree.map(lambda _: P(shd.BATCH_AXES), tasks)
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), task_spec), out_specs=P(),
                       check_vma=False)(meta_params, tasks)


def make_meta_step(features_fn: FeaturesFn, cfg: MetaConfig, optimizer, *, mesh=None,
                   donate: bool = True) -> Callable:
  """A jitted ``step(meta_params, opt_state, tasks) -> (meta_params, opt_state, metrics)``.

  `optimizer` is an optax GradientTransformation (for Reptile, ``optax.sgd(epsilon)``
  applies its update exactly). With a mesh, put tasks on the mesh with `task_shardings`
  (the step also accepts host arrays); parameters are replicated; T must be a multiple of
  the batch-axes size (data x fsdp).
  """
  def step(meta_params, opt_state, tasks):
    if mesh is None:
      grads, metrics = meta_grad(meta_params, tasks, features_fn=features_fn, cfg=cfg)
    else:
      grads, metrics = sharded_meta_grad(meta_params, tasks, features_fn=features_fn,
                                         cfg=cfg, mesh=mesh)
    updates, opt_state = optimizer.update(grads, opt_state, meta_params)
    return optax.apply_updates(meta_params, updates), opt_state, metrics

  kwargs = {"donate_argnums": (0, 1)} if donate else {}
  if mesh is not None:
    rep = shd.replicated(mesh)
    kwargs["out_shardings"] = (rep, rep, rep)
  return jax.jit(step, **kwargs)
