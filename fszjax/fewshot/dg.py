"""Domain generalisation: MLDG, leave-one-domain-out evaluation, WiSE-FT.

MLDG (Li et al., 2018) splits the source domains of each step into meta-train and
meta-test domains (`fszjax.data.episodes.EpisodeSampler.mldg_batch`) and minimises

  F(theta) + beta * G(theta - alpha * grad F(theta))

with F the loss on the meta-train domains and G on the meta-test domains. Second order
differentiates through ``grad F``; first order treats it as a constant (the gradient of G
is then taken at the shifted point).

WiSE-FT (Wortsman et al., 2022): ``(1 - alpha) * zero_shot + alpha * fine_tuned`` weights;
`wise_ft_sweep` evaluates a list of alphas.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fszjax.fewshot import inner as inner_lib
from fszjax.fewshot.inner import FeaturesFn, Params

LossFn = Callable[[Params, Any], jax.Array]


def classifier_loss(features_fn: FeaturesFn) -> LossFn:
  """``loss(params, batch)``: cross-entropy of ``{'backbone', 'head'}`` on batch {'x', 'y'}."""

  def loss(params, batch):
    return inner_lib.cross_entropy(
        inner_lib.apply_model(features_fn, params, batch["x"]), batch["y"])

  return loss


def _mean_loss(loss_fn: LossFn, params: Params, batches) -> jax.Array:
  """Loss of one batch, or the mean over a list/tuple of per-domain batches."""
  if isinstance(batches, (list, tuple)):
    return sum(loss_fn(params, b) for b in batches) / len(batches)
  return loss_fn(params, batches)


def mldg_objective(params: Params, train_batch, test_batch, *, loss_fn: LossFn,
                   alpha: float, beta: float = 1.0,
                   first_order: bool = False) -> tuple[jax.Array, dict]:
  """``F(params) + beta * G(params - alpha * grad F(params))`` and {'F', 'G', 'objective'}.

  Args:
    params: model parameters (any pytree).
    train_batch / test_batch: a batch (or a list of per-domain batches, averaged) from the
      meta-train / meta-test domains, passed to ``loss_fn(params, batch) -> scalar``.
    alpha: inner step size; beta: weight of the meta-test loss.
    first_order: stop gradients through ``grad F``.
  """
  f, g = jax.value_and_grad(lambda p: _mean_loss(loss_fn, p, train_batch))(params)
  if first_order:
    g = jax.lax.stop_gradient(g)
  shifted = jax.tree.map(lambda p, d: p - alpha * d, params, g)
  big_g = _mean_loss(loss_fn, shifted, test_batch)
  obj = f + beta * big_g
  return obj, {"F": f, "G": big_g, "objective": obj}


def make_mldg_step(loss_fn: LossFn, optimizer, *, alpha: float, beta: float = 1.0,
                   first_order: bool = False, donate: bool = True) -> Callable:
  """Jitted ``step(params, opt_state, train_batch, test_batch) -> (params, opt_state, metrics)``."""
  def step(params, opt_state, train_batch, test_batch):
    (_, metrics), grads = jax.value_and_grad(mldg_objective, has_aux=True)(
        params, train_batch, test_batch, loss_fn=loss_fn, alpha=alpha, beta=beta,
        first_order=first_order)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def leave_one_domain_out(domains: Sequence[Any],
                         run_fn: Callable[[list, Any], dict]) -> dict:
  """Leave-one-domain-out: ``run_fn(train_domains, held_out_domain) -> metrics`` per domain.

  Returns ``{'per_domain': {domain: metrics}, 'mean': {k: mean}, 'worst': {k: min}}``
  (mean / worst over held-out domains of every scalar metric).
  """
  domains = list(domains)
  if len(domains) < 2:
    raise ValueError(f"leave-one-domain-out needs >= 2 domains; got {domains}")
  per = {}
  for d in domains:
    per[d] = {k: float(v) for k, v in run_fn([x for x in domains if x != d], d).items()}
  keys = sorted(set.intersection(*(set(m) for m in per.values())))
  return {"per_domain": per,
          "mean": {k: float(np.mean([m[k] for m in per.values()])) for k in keys},
          "worst": {k: float(np.min([m[k] for m in per.values()])) for k in keys}}


def wise_ft(zero_shot: Params, fine_tuned: Params, alpha: float | jax.Array) -> Params:
  """``(1 - alpha) * zero_shot + alpha * fine_tuned`` leaf by leaf (same tree structure)."""
  s0, s1 = jax.tree.structure(zero_shot), jax.tree.structure(fine_tuned)
  if s0 != s1:
    raise ValueError(f"WiSE-FT needs identically structured weights; got {s0} and {s1}")
  return jax.tree.map(lambda a, b: (1 - alpha) * a + alpha * b, zero_shot, fine_tuned)


def wise_ft_sweep(zero_shot: Params, fine_tuned: Params,
                  eval_fn: Callable[[Params], dict],
                  alphas: Iterable[float] = tuple(np.linspace(0.0, 1.0, 11))) -> dict:
  """Evaluates ``eval_fn(wise_ft(zs, ft, alpha))`` (metrics dict) for each alpha.

  Returns ``{'alphas': [...], 'results': [{'alpha': a, **metrics}, ...]}``.
  """
  alphas = [float(a) for a in alphas]
  results = []
  for a in alphas:
    m = eval_fn(wise_ft(zero_shot, fine_tuned, jnp.float32(a)))
    results.append({"alpha": a, **{k: float(v) for k, v in m.items()}})
  return {"alphas": alphas, "results": results}
