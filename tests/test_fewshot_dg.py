"""MLDG objective by hand, WiSE-FT, leave-one-domain-out, and the no-meta-training baselines."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fszjax.fewshot import baselines, dg, inner
from tests.test_fewshot_meta import features_fn, flat, init_params


def batch(key, n=6):
  kx, ky = jax.random.split(key)
  return {"x": jax.random.normal(kx, (n, 4)), "y": jax.random.randint(ky, (n,), 0, 3)}


@pytest.mark.parametrize("first_order", [False, True])
def test_mldg_objective_matches_hand_computation(first_order):
  params = init_params(jax.random.key(0))
  tr, te = [batch(jax.random.key(1)), batch(jax.random.key(2))], batch(jax.random.key(3))
  loss_fn = dg.classifier_loss(features_fn)
  alpha, beta = 0.2, 0.7

  @jax.jit
  def run(p):
    return jax.value_and_grad(
        lambda p: dg.mldg_objective(p, tr, te, loss_fn=loss_fn, alpha=alpha, beta=beta,
                                    first_order=first_order)[0])(p)

  def ce(p, b):
    logits = jnp.tanh(b["x"] @ p["backbone"]["w1"] + p["backbone"]["b1"]) @ p["head"]["w"] + p["head"]["b"]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(b["y"])), b["y"]])

  @jax.jit
  def hand(p):
    def obj(p):
      f = lambda p: 0.5 * (ce(p, tr[0]) + ce(p, tr[1]))
      g = jax.grad(f)(p)
      if first_order:
        g = jax.lax.stop_gradient(g)
      return f(p) + beta * ce(jax.tree.map(lambda a, b: a - alpha * b, p, g), te)
    return jax.value_and_grad(obj)(p)

  (v, g), (hv, hg) = run(params), hand(params)
  np.testing.assert_allclose(v, hv, rtol=1e-6)
  np.testing.assert_allclose(flat(g), flat(hg), rtol=1e-5, atol=1e-6)
  if not first_order:
    return
  step = dg.make_mldg_step(loss_fn, optax.sgd(0.1), alpha=alpha, beta=beta,
                           first_order=first_order, donate=False)
  new, _, metrics = step(params, optax.sgd(0.1).init(params), tr, te)
  np.testing.assert_allclose(flat(new), flat(params) - 0.1 * flat(hg), rtol=1e-5, atol=1e-6)
  assert set(metrics) == {"F", "G", "objective"}


def test_wise_ft_and_sweep():
  zs = {"a": jnp.zeros(3), "b": jnp.ones(())}
  ft = {"a": jnp.full(3, 2.0), "b": jnp.full((), 3.0)}
  mid = dg.wise_ft(zs, ft, 0.25)
  np.testing.assert_allclose(mid["a"], 0.5)
  np.testing.assert_allclose(mid["b"], 1.5)
  out = dg.wise_ft_sweep(zs, ft, lambda p: {"a0": p["a"][0]}, alphas=[0.0, 0.5, 1.0])
  assert [r["a0"] for r in out["results"]] == [0.0, 1.0, 2.0]
  with pytest.raises(ValueError, match="identically structured"):
    dg.wise_ft(zs, {"a": jnp.zeros(3)}, 0.5)


def test_leave_one_domain_out():
  seen = []

  def run(train, held):
    seen.append((tuple(train), held))
    return {"acc": 0.1 * held}

  out = dg.leave_one_domain_out([1, 2, 3], run)
  assert seen == [((2, 3), 1), ((1, 3), 2), ((1, 2), 3)]
  np.testing.assert_allclose(out["mean"]["acc"], 0.2)
  np.testing.assert_allclose(out["worst"]["acc"], 0.1)
  assert set(out["per_domain"]) == {1, 2, 3}


def separable_tasks(t=2, n_way=3, k=4, q=4, d=6):
  """Tasks whose classes are well-separated Gaussian blobs."""
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(t, n_way, d)) * 4.0
  ys, yq = np.repeat(np.arange(n_way), k), np.repeat(np.arange(n_way), q)
  return {"support_x": jnp.asarray(centers[:, ys] + rng.normal(size=(t, n_way * k, d)), jnp.float32),
          "support_y": jnp.asarray(np.tile(ys, (t, 1))),
          "query_x": jnp.asarray(centers[:, yq] + rng.normal(size=(t, n_way * q, d)), jnp.float32),
          "query_y": jnp.asarray(np.tile(yq, (t, 1)))}


def test_baselines_solve_separable_tasks():
  tasks = separable_tasks()
  proto = baselines.evaluate_tasks(
      lambda t: baselines.nearest_prototype(baselines.pixel_features, None, t, n_way=3), tasks)
  assert float(proto["acc"]) == 1.0
  cos = baselines.evaluate_tasks(
      lambda t: baselines.nearest_prototype(baselines.pixel_features, None, t, n_way=3,
                                            metric="cosine"), tasks, chunk=1)
  assert float(cos["acc"]) >= 0.9
  probe = baselines.evaluate_tasks(
      lambda t: baselines.linear_probe(baselines.pixel_features, None, t, n_way=3, steps=50,
                                       lr=0.1), tasks)
  assert float(probe["acc"]) >= 0.9
  ident = lambda b, x: x @ b["w"]
  params = {"backbone": {"w": jnp.eye(6)}, "head": inner.zeros_head(6, 3)}
  ft = baselines.evaluate_tasks(
      lambda t: baselines.finetune(ident, params, t, n_way=3, steps=20, lr=0.05), tasks)
  assert float(ft["acc"]) >= 0.9
