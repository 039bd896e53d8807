"""The inner loop of few-shot adaptation: SGD steps on a support set as a `lax.scan`.

Everything here is a pure function of one task; the meta-learners of `fszjax.fewshot.meta`
``vmap`` it over a meta-batch and differentiate through it.

Conventions:

- A model is ``features_fn(backbone_params, x) -> (B, D)`` plus a linear head
  ``{'w': (D, N), 'b': (N,)}``; full parameters are ``{'backbone': ..., 'head': ...}``.
- What adapts in the inner loop is a *mask*: a pytree of Python bools with the structure
  of the parameters, built by `adapt_mask` from ``'all'``, ``'head'``, ``'none'``, an int
  ``k`` (the last k blocks plus the head), a predicate on ``'/'``-joined parameter paths,
  or given directly. Frozen leaves are closed over (no inner gradient is computed for
  them) but still receive meta-gradients through the adapted model.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from fszjax.tree import path_str  # noqa: F401  (re-exported)

Params = Any
FeaturesFn = Callable[[Any, jax.Array], jax.Array]
HEAD_INITS = ("learned", "zeros", "prototype", "zeroshot")
BLOCK_PATTERN = r"(?:block|layer|layers|conv|encoderblock)_?(\d+)$"


# ----------------------------------------------------------------------------- heads


def linear_head(head: dict, feats: jax.Array) -> jax.Array:
  """Logits (B, N) of a linear head ``{'w': (D, N), 'b': (N,)}`` on features (B, D)."""
  return feats @ head["w"] + head["b"]


def apply_model(features_fn: FeaturesFn, params: Params, x: jax.Array) -> jax.Array:
  """Logits (B, N) of ``{'backbone', 'head'}`` params on inputs x (B, ...)."""
  return linear_head(params["head"], features_fn(params["backbone"], x))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  return x * lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True), eps))


def zeros_head(dim: int, n_way: int, dtype=jnp.float32) -> dict:
  """Head ``{'w': (dim, n_way), 'b': (n_way,)}`` of zeros."""
  return {"w": jnp.zeros((dim, n_way), dtype), "b": jnp.zeros((n_way,), dtype)}


def zeroshot_head(text_emb: jax.Array, logit_scale: float | jax.Array = 1.0,
                  logit_bias: float | jax.Array = 0.0) -> dict:
  """Head from class text embeddings (N, D): ``w = normalize(text).T * scale`` (D, N).

  On L2-normalised image features its logits are ``scale * cos(image, text) + bias``:
  exactly the zero-shot classifier of a two-tower model (CLIP: bias 0; SigLIP: its bias).
  """
  w = l2_normalize(text_emb).T * logit_scale
  return {"w": w, "b": jnp.zeros((text_emb.shape[0],), w.dtype) + logit_bias}


def prototypes(feats: jax.Array, labels: jax.Array, n_way: int) -> jax.Array:
  """Class means (n_way, D) of features (B, D) with labels (B,) in 0..n_way-1."""
  onehot = jax.nn.one_hot(labels, n_way, dtype=feats.dtype)  # (B, N)
  counts = jnp.maximum(onehot.sum(0), 1.0)
  return (onehot.T @ feats) / counts[:, None]


def prototype_head(feats: jax.Array, labels: jax.Array, n_way: int) -> dict:
  """Linear head equal to ProtoNets' classifier: logits = -|f - c|^2 up to a per-row constant.

  ``w = 2 c.T`` (D, N), ``b = -|c|^2`` (N,) (Proto-MAML's initialisation).
  """
  c = prototypes(feats, labels, n_way)
  return {"w": 2.0 * c.T, "b": -jnp.sum(jnp.square(c), axis=-1)}


# ----------------------------------------------------------------------------- losses


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of logits (B, N) against int labels (B,)."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of rows whose argmax equals the label."""
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


# ----------------------------------------------------------------------------- masks


def head_only(path: str) -> bool:
  """Predicate: only parameters under ``head`` adapt (ANIL)."""
  return path.split("/")[0] == "head"


def last_k_blocks(params: Params, k: int, pattern: str = BLOCK_PATTERN) -> Callable[[str], bool]:
  """Predicate: the head plus parameters under the k highest-numbered blocks.

  Blocks are path components matching `pattern` (``conv3``, ``block_11``, ...), numbered
  by their trailing integer; a stacked (``nn.scan``) layer axis cannot be split this way.
  """
  rx = re.compile(pattern)
  paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  nums = sorted({int(m.group(1)) for p in paths for c in p.split("/") if (m := rx.search(c))})
  if k > 0 and not nums:
    raise ValueError(f"adapt={k}: no parameter path component matches block pattern {pattern!r}")
  keep = set(nums[-k:]) if k > 0 else set()

  def pred(path: str) -> bool:
    if head_only(path):
      return True
    return any((m := rx.search(c)) and int(m.group(1)) in keep for c in path.split("/"))

  return pred


def adapt_mask(params: Params, adapt: Any = "all") -> Params:
  """A pytree of Python bools (structure of params): True where the inner loop adapts.

  adapt: ``'all'``, ``'head'``, ``'none'``, an int k (last k blocks + head), a predicate
  ``f(path: str) -> bool`` on '/'-joined paths, or a pytree of bools (returned as is).
  """
  if isinstance(adapt, bool):
    adapt = "all" if adapt else "none"
  if isinstance(adapt, str):
    if adapt == "all":
      pred = lambda p: True
    elif adapt == "head":
      pred = head_only
    elif adapt == "none":
      pred = lambda p: False
    else:
      raise ValueError(f"adapt={adapt!r}: use 'all', 'head', 'none', an int k, a predicate or a mask")
  elif isinstance(adapt, int):
    pred = last_k_blocks(params, adapt)
  elif callable(adapt):
    pred = adapt
  else:
    return adapt
  return jax.tree_util.tree_map_with_path(lambda p, _: bool(pred(path_str(p))), params)


# ----------------------------------------------------------------------------- inner loop


def _split(params: Params, mask: Params):
  leaves, treedef = jax.tree.flatten(params)
  mleaves = treedef.flatten_up_to(mask) if mask is not None else [True] * len(leaves)
  idx = [i for i, m in enumerate(mleaves) if m]

  def merge(adapted):
    out = list(leaves)
    for i, a in zip(idx, adapted):
      out[i] = a
    return treedef.unflatten(out)

  return [leaves[i] for i in idx], idx, merge, treedef


def inner_loop(loss_fn: Callable[[Params], jax.Array], params: Params, *, steps: int,
               lr: float | jax.Array | Params, mask: Params | None = None,
               first_order: bool = False, remat: bool = False,
               unroll: int | bool = 1) -> tuple[Params, jax.Array]:
  """`steps` SGD steps on ``loss_fn(params) -> scalar`` (the support loss), as a `lax.scan`.

  Args:
    loss_fn: support loss of the full parameters (closes over the support batch).
    params: initial (meta-learned) parameters.
    steps: number of inner steps (0 returns params unchanged).
    lr: scalar step size, or a pytree like params of per-parameter step sizes (Meta-SGD;
      entries of frozen leaves are ignored).
    mask: pytree of bools from `adapt_mask`; None adapts everything.
    first_order: drop second-order terms (gradients of the inner gradients) as in FOMAML.
    remat: `jax.checkpoint` each inner step: the backward pass keeps only each step's
      parameters and recomputes its activations (memory of one step's activations, for an
      extra forward/backward of the support set per step).
    unroll: `lax.scan` unroll factor.
  Returns:
    (adapted params, support losses (steps,) before each step).
  """
  adapted0, idx, merge, treedef = _split(params, mask)
  if isinstance(lr, (int, float)) or (hasattr(lr, "ndim") and lr.ndim == 0):
    lrs = [lr] * len(idx)
  else:
    lr_leaves = treedef.flatten_up_to(lr)
    lrs = [lr_leaves[i] for i in idx]

  def adapted_loss(adapted):
    return loss_fn(merge(adapted))

  def step(adapted, _):
    loss, grads = jax.value_and_grad(adapted_loss)(adapted)
    if first_order:
      grads = lax.stop_gradient(grads)
    return [a - l * g for a, l, g in zip(adapted, lrs, grads)], loss

  if remat:
    step = jax.checkpoint(step)
  if steps == 0 or not idx:
    return params, jnp.zeros((0,), jnp.float32)
  adapted, losses = lax.scan(step, adapted0, None, length=steps, unroll=unroll)
  return merge(adapted), losses
