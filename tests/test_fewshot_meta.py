"""Meta-learners on a tiny model: MAML, FOMAML, Reptile, Meta-SGD, ANIL, ProtoNets, head inits."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fszjax.fewshot import inner, meta

N_WAY, D_IN, D_FEAT = 3, 4, 5


def features_fn(backbone, x):
  return jnp.tanh(x @ backbone["w1"] + backbone["b1"])


def init_params(key, dtype=jnp.float32):
  k1, k2 = jax.random.split(key)
  return {"backbone": {"w1": 0.7 * jax.random.normal(k1, (D_IN, D_FEAT), dtype),
                       "b1": jnp.full((D_FEAT,), 0.1, dtype)},
          "head": {"w": 0.5 * jax.random.normal(k2, (D_FEAT, N_WAY), dtype),
                   "b": jnp.zeros((N_WAY,), dtype)}}


def make_tasks(key, t=2, k_shot=2, q=2, dtype=jnp.float32):
  ks, kq = jax.random.split(key)
  return {"support_x": jax.random.normal(ks, (t, N_WAY * k_shot, D_IN), dtype),
          "support_y": jnp.tile(jnp.repeat(jnp.arange(N_WAY), k_shot), (t, 1)),
          "query_x": jax.random.normal(kq, (t, N_WAY * q, D_IN), dtype),
          "query_y": jnp.tile(jnp.repeat(jnp.arange(N_WAY), q), (t, 1))}


def one(tasks, i):
  return jax.tree.map(lambda x: x[i], tasks)


def loss(p, x, y):
  return inner.cross_entropy(inner.apply_model(features_fn, p, x), y)


def unrolled_query_loss(p, task, steps, lr, first_order=False):
  """MAML by hand: a Python loop of explicit SGD steps."""
  for _ in range(steps):
    g = jax.grad(loss)(p, task["support_x"], task["support_y"])
    if first_order:
      g = jax.lax.stop_gradient(g)
    p = jax.tree.map(lambda a, b: a - lr * b, p, g)
  return loss(p, task["query_x"], task["query_y"])


def mgrad(params, tasks, cfg):
  """Jitted meta.meta_grad (eager op-by-op dispatch is slow on a busy CPU)."""
  return jax.jit(lambda p, t: meta.meta_grad(p, t, features_fn=features_fn, cfg=cfg))(params, tasks)


def hand_grad(params, tasks, steps, lr, first_order=False):
  t = tasks["support_x"].shape[0]
  return jax.jit(jax.grad(lambda p: jnp.mean(jnp.stack(
      [unrolled_query_loss(p, one(tasks, i), steps, lr, first_order) for i in range(t)]))))(params)


def flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


CFG = meta.MetaConfig(algorithm="maml", n_way=N_WAY, inner_steps=2, inner_lr=0.3)


def test_maml_matches_unrolled_and_finite_differences():
  params, tasks = init_params(jax.random.key(0)), make_tasks(jax.random.key(1))
  grads, metrics = mgrad(params, tasks, CFG)
  hand = hand_grad(params, tasks, 2, 0.3)
  chex.assert_trees_all_close(grads, hand, rtol=1e-5, atol=1e-6)
  assert np.isfinite(float(metrics["loss"]))
  # Central finite differences in float64 along a random direction.
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    t64 = jax.tree.map(lambda x: np.asarray(x, np.float64) if x.dtype == np.float32 else x, tasks)
    f = lambda p: meta.meta_loss(p, t64, features_fn=features_fn, cfg=CFG)[0]
    f = jax.jit(f)
    g64 = jax.jit(jax.grad(f))(p64)
    v = jax.tree.map(lambda x: np.random.default_rng(0).normal(size=x.shape), p64)
    eps = 1e-5
    plus = jax.tree.map(lambda a, b: a + eps * b, p64, v)
    minus = jax.tree.map(lambda a, b: a - eps * b, p64, v)
    fd = (float(f(plus)) - float(f(minus))) / (2 * eps)
    np.testing.assert_allclose(float(flat(g64) @ flat(v)), fd, rtol=1e-6)
  chex.assert_trees_all_close(grads, g64, rtol=1e-4, atol=1e-5)


def test_fomaml_drops_second_order_terms():
  params, tasks = init_params(jax.random.key(2)), make_tasks(jax.random.key(3))
  cfg = dataclasses.replace(CFG, algorithm="fomaml")
  grads, _ = mgrad(params, tasks, cfg)
  hand = hand_grad(params, tasks, 2, 0.3, first_order=True)
  chex.assert_trees_all_close(grads, hand, rtol=1e-5, atol=1e-6)
  # First order = the query gradient at the adapted params.
  @jax.jit
  def at_adapted(task):
    adapted, _ = meta.adapt(features_fn, cfg, params, task)
    return jax.grad(loss)(adapted, task["query_x"], task["query_y"])
  per = [at_adapted(one(tasks, i)) for i in range(2)]
  mean_per = jax.tree.map(lambda *g: np.mean(g, 0), *per)
  chex.assert_trees_all_close(grads, mean_per, rtol=1e-5, atol=1e-6)
  second, _ = mgrad(params, tasks, CFG)
  assert not np.allclose(flat(second), flat(grads), atol=1e-4)


def test_reptile_update_is_mean_of_deltas():
  params, tasks = init_params(jax.random.key(4)), make_tasks(jax.random.key(5))
  cfg = dataclasses.replace(CFG, algorithm="reptile", inner_steps=3)
  eps = 0.25
  new = jax.jit(lambda p, t: meta.reptile_update(p, t, eps, features_fn=features_fn, cfg=cfg))(
      params, tasks)

  @jax.jit
  def sgd3(p, x, y):
    for _ in range(3):
      p = jax.tree.map(lambda a, b: a - 0.3 * b, p, jax.grad(loss)(p, x, y))
    return p

  deltas = [jax.tree.map(np.subtract, sgd3(params, tasks["support_x"][i], tasks["support_y"][i]),
                         params) for i in range(2)]
  want = jax.tree.map(lambda p, *d: p + eps * np.mean(d, 0), params, *deltas)
  chex.assert_trees_all_close(new, want, rtol=1e-5, atol=1e-6)
  # The same update through make_meta_step with optax.sgd(eps).
  step = meta.make_meta_step(features_fn, cfg, optax.sgd(eps), donate=False)
  stepped, _, _ = step(params, optax.sgd(eps).init(params), tasks)
  chex.assert_trees_all_close(stepped, new, rtol=1e-5, atol=1e-6)


def test_metasgd_learning_rates_get_gradients():
  cfg = dataclasses.replace(CFG, algorithm="metasgd")
  mp = meta.init_meta_params(cfg, init_params(jax.random.key(6)))
  grads, _ = mgrad(mp, make_tasks(jax.random.key(7)), cfg)
  for g in jax.tree.leaves(grads["inner_lr"]):
    assert np.all(np.isfinite(g)) and np.any(np.abs(g) > 0)
  # With every per-parameter rate equal, Meta-SGD's parameter gradient equals MAML's.
  maml_g, _ = mgrad(mp["params"], make_tasks(jax.random.key(7)), CFG)
  chex.assert_trees_all_close(grads["params"], maml_g, rtol=1e-5, atol=1e-6)


def test_anil_adapts_only_the_head():
  params, tasks = init_params(jax.random.key(8)), make_tasks(jax.random.key(9))
  cfg = dataclasses.replace(CFG, algorithm="anil")
  adapted, _ = jax.jit(lambda p, t: meta.adapt(features_fn, cfg, p, t))(params, one(tasks, 0))
  chex.assert_trees_all_equal(adapted["backbone"], params["backbone"])
  assert not np.allclose(flat(adapted["head"]), flat(params["head"]))
  # Same as MAML with a head-only mask (the backbone still gets a meta-gradient).
  g_anil, _ = mgrad(params, tasks, cfg)
  g_mask, _ = mgrad(params, tasks, dataclasses.replace(CFG, adapt="head"))
  chex.assert_trees_all_close(g_anil, g_mask, rtol=1e-5, atol=1e-6)
  assert np.any(np.abs(flat(g_anil["backbone"])) > 0)


def test_adapt_masks():
  params = {"backbone": {f"conv{i}": {"w": jnp.ones(2)} for i in range(4)},
            "head": {"w": jnp.ones(2), "b": jnp.ones(1)}}
  m = inner.adapt_mask(params, 2)
  assert [m["backbone"][f"conv{i}"]["w"] for i in range(4)] == [False, False, True, True]
  assert m["head"] == {"w": True, "b": True}
  assert not any(jax.tree.leaves(inner.adapt_mask(params, "head")["backbone"]))
  assert all(jax.tree.leaves(inner.adapt_mask(params, "all")))
  with pytest.raises(ValueError, match="adapt="):
    inner.adapt_mask(params, "sometimes")


def test_zeroshot_head_init_with_zero_steps_is_the_zero_shot_classifier():
  key = jax.random.key(10)
  text = jax.random.normal(key, (N_WAY, D_FEAT))
  normed = lambda b, x: inner.l2_normalize(features_fn(b, x))
  params, tasks = init_params(jax.random.key(11)), make_tasks(jax.random.key(12))
  task = dict(one(tasks, 0), text_emb=text)
  cfg = dataclasses.replace(CFG, head_init="zeroshot", inner_steps=0, logit_scale=10.0)
  adapted, _ = jax.jit(lambda p, t: meta.adapt(normed, cfg, p, t))(params, task)
  got = inner.apply_model(normed, adapted, task["query_x"])
  img = inner.l2_normalize(features_fn(params["backbone"], task["query_x"]))
  want = 10.0 * img @ inner.l2_normalize(text).T
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(jnp.argmax(got, -1), jnp.argmax(want, -1))
  # With inner steps the zero-shot head is the starting point and it moves.
  moved, _ = jax.jit(lambda p, t: meta.adapt(normed, dataclasses.replace(cfg, inner_steps=2), p, t))(
      params, task)
  assert not np.allclose(flat(moved["head"]), flat(adapted["head"]))


def test_protonet_and_prototype_head():
  params, tasks = init_params(jax.random.key(13)), make_tasks(jax.random.key(14))
  task = one(tasks, 0)
  cfg = dataclasses.replace(CFG, algorithm="protonet")
  l, m = jax.jit(lambda p, t: meta.task_loss(p, t, features_fn=features_fn, cfg=cfg))(params, task)
  fs = features_fn(params["backbone"], task["support_x"])
  fq = features_fn(params["backbone"], task["query_x"])
  c = np.stack([fs[task["support_y"] == j].mean(0) for j in range(N_WAY)])
  logits = -((fq[:, None, :] - c[None]) ** 2).sum(-1)
  np.testing.assert_allclose(l, inner.cross_entropy(logits, task["query_y"]), rtol=1e-5)
  head = inner.prototype_head(fs, task["support_y"], N_WAY)
  # Linear prototype head = ProtoNet logits + a per-row constant.
  diff = inner.linear_head(head, fq) - logits
  np.testing.assert_allclose(diff - diff[:, :1], 0.0, atol=1e-5)
  g, _ = mgrad(params, tasks, cfg)
  assert np.any(np.abs(flat(g["backbone"])) > 0)


@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
def test_chunked_equals_vmapped(algorithm):
  params, tasks = init_params(jax.random.key(15)), make_tasks(jax.random.key(16), t=4)
  cfg = dataclasses.replace(CFG, algorithm=algorithm, remat=True)
  g0, m0 = mgrad(params, tasks, cfg)
  g2, m2 = mgrad(params, tasks, dataclasses.replace(cfg, task_chunk=2, remat=False))
  chex.assert_trees_all_close(g0, g2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m0["loss"], m2["loss"], rtol=1e-5)
  with pytest.raises(ValueError, match="task_chunk=3"):
    meta.meta_grad(params, tasks, features_fn=features_fn,
                   cfg=dataclasses.replace(cfg, task_chunk=3))


def test_evaluate_improves_after_meta_training():
  params, tasks = init_params(jax.random.key(17)), make_tasks(jax.random.key(18), t=8)
  opt = optax.adam(0.05)
  step = meta.make_meta_step(features_fn, CFG, opt, donate=False)
  state = opt.init(params)
  ev = jax.jit(lambda p, t: meta.evaluate(p, t, features_fn=features_fn, cfg=CFG))
  before = ev(params, tasks)["loss"]
  for _ in range(15):
    params, state, _ = step(params, state, tasks)
  after = ev(params, tasks)["loss"]
  assert float(after) < float(before)


def test_bad_config_errors():
  with pytest.raises(ValueError, match="algorithm="):
    meta.MetaConfig(algorithm="mamll")
  with pytest.raises(ValueError, match="head_init="):
    meta.MetaConfig(head_init="text")
  cfg = dataclasses.replace(CFG, head_init="zeroshot")
  with pytest.raises(ValueError, match="text_emb"):
    meta.adapt(features_fn, cfg, init_params(jax.random.key(0)), one(make_tasks(jax.random.key(1)), 0))


def test_evaluation_adapts_with_eval_steps_and_lr():
  params = init_params(jax.random.key(3))
  tasks = make_tasks(jax.random.key(4), t=3)
  cfg = meta.MetaConfig(algorithm="maml", n_way=N_WAY, inner_steps=5, inner_lr=0.4,
                        eval_inner_steps=2, eval_inner_lr=0.1)
  e = cfg.for_eval()
  assert (e.inner_steps, e.inner_lr, e.algorithm) == (2, 0.1, "maml")
  assert dataclasses.replace(cfg, algorithm="reptile").for_eval().algorithm == "fomaml"
  got = meta.evaluate(params, tasks, features_fn=features_fn, cfg=cfg)
  # Same as a config trained with 2 steps of 0.1, by hand: the query loss after 2 SGD steps.
  want = np.mean([float(unrolled_query_loss(params, one(tasks, i), 2, 0.1)) for i in range(3)])
  np.testing.assert_allclose(float(got["loss"]), want, rtol=1e-5)
  other = meta.evaluate(params, tasks, features_fn=features_fn,
                        cfg=dataclasses.replace(cfg, eval_inner_steps=None, eval_inner_lr=None))
  assert abs(float(other["loss"]) - want) > 1e-4  # 5 steps of 0.4 differ
