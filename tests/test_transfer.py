"""Values of the transfer-learning few-shot methods (fszjax/fewshot/transfer.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fszjax.fewshot import inner, transfer
from fszjax.models import stem as stem_lib


def _task(seed=0, n_way=5, k=2, q=3, d=8):
  rng = np.random.default_rng(seed)
  norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  fs = norm(rng.normal(size=(n_way * k, d))).astype(np.float32)
  ys = np.repeat(np.arange(n_way), k).astype(np.int32)
  fq = norm(rng.normal(size=(n_way * q, d))).astype(np.float32)
  yq = np.repeat(np.arange(n_way), q).astype(np.int32)
  text = norm(rng.normal(size=(n_way, d))).astype(np.float32)
  return fs, ys, fq, yq, text


def _proto_logits(fs, ys, fq, n_way):
  c = np.stack([fs[ys == j].mean(0) for j in range(n_way)])
  return -((fq[:, None, :] - c[None]) ** 2).sum(-1)


def test_proto_head_at_step0_is_protonets_and_weight0_is_zeroshot():
  fs, ys, fq, _, text = _task()
  scale, bias = 20.0, -3.0
  got = np.asarray(transfer.proto_zeroshot_adapt(fs, ys, fq, text, 5, scale, bias, 1.0, 0, 0.5))
  want = _proto_logits(fs, ys, fq, 5)
  # Logits = scale * (|f|^2 - |f - c|^2): ProtoNets' up to a per-query constant.
  diff = got - scale * want
  np.testing.assert_allclose(diff - diff[:, :1], 0.0, atol=1e-4)
  zs = np.asarray(transfer.proto_zeroshot_adapt(fs, ys, fq, text, 5, scale, bias, 0.0, 0, 0.5))
  np.testing.assert_allclose(zs, scale * fq @ text.T + bias, rtol=1e-5, atol=1e-4)
  mid = np.asarray(transfer.proto_zeroshot_adapt(fs, ys, fq, text, 5, scale, bias, 0.5, 0, 0.5))
  np.testing.assert_allclose(mid, 0.5 * got + 0.5 * zs, rtol=1e-5, atol=1e-4)


def test_proto_zeroshot_adapt_steps_fit_support():
  fs, ys, _, _, text = _task(1)
  loss = lambda logits: float(inner.cross_entropy(logits, ys))
  before = transfer.proto_zeroshot_adapt(fs, ys, fs, text, 5, 10.0, 0.0, 0.5, 0, 0.5)
  after = transfer.proto_zeroshot_adapt(fs, ys, fs, text, 5, 10.0, 0.0, 0.5, 20, 0.5)
  assert loss(after) < loss(before) - 0.05


def test_tip_adapter_limits():
  fs, ys, fq, _, text = _task(2)
  scale, bias = 15.0, 0.5
  zs = scale * fq @ text.T + bias
  a0 = np.asarray(transfer.tip_adapter_logits(fs, ys, fq, text, 5, scale, bias, 0.0, 5.0))
  np.testing.assert_allclose(a0, zs, rtol=1e-5, atol=1e-4)
  # beta = 0: every class's cache score is its shot count (balanced): argmax = zero-shot.
  b0 = np.asarray(transfer.tip_adapter_logits(fs, ys, fq, text, 5, scale, bias, 3.0, 0.0))
  np.testing.assert_allclose(b0, zs + 3.0 * scale * 2.0, rtol=1e-5, atol=1e-4)
  # A query equal to a support example, large alpha and beta: the cache decides.
  q = fs[[3]]
  big = np.asarray(transfer.tip_adapter_logits(fs, ys, q, text, 5, scale, bias, 100.0, 50.0))
  assert int(np.argmax(big)) == int(ys[3])


def test_make_feature_eval_batches_tasks():
  fs, ys, fq, yq, text = _task(3)
  fn = transfer.make_feature_eval(5, 20.0, 0.0, 1.0, 0, 0.5, 0.0, 1.0, False)
  st = lambda x: np.stack([x, x])
  out = fn(st(fs), st(ys), st(fq), st(yq), st(text), np.zeros((2, 1, 1)), np.zeros((2, 1, 1)))
  proto_acc = np.mean(np.argmax(_proto_logits(fs, ys, fq, 5), 1) == yq)
  zs_acc = np.mean(np.argmax(fq @ text.T, 1) == yq)
  np.testing.assert_allclose(np.asarray(out["proto_zs_adapt"]), [proto_acc] * 2, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out["tip_adapter"]), [zs_acc] * 2, atol=1e-6)


def test_support_gate():
  fs, ys, fq, _, text = _task(4)
  # Text embeddings equal to the support features: zero-shot names the support right.
  good = np.stack([fs[ys == j][0] for j in range(5)])
  assert float(transfer.support_gate(fs[::2], ys[::2], good, 5)) == 1.0
  # A zero-shot classifier that names every support example wrong: gate 0, so the gated
  # methods are ProtoNets and the cache alone.
  bad = np.roll(good, 1, axis=0)
  assert float(transfer.support_gate(fs[::2], ys[::2], bad, 5)) == 0.0
  sx, sy = fs[::2], ys[::2]
  gated = np.asarray(transfer.proto_zeroshot_adapt(sx, sy, fq, bad, 5, 20.0, 1.0, 0.25, 0, 0.5,
                                                   gate=True))
  proto = np.asarray(transfer.proto_zeroshot_adapt(sx, sy, fq, bad, 5, 20.0, 1.0, 1.0, 0, 0.5))
  np.testing.assert_allclose(gated, proto, rtol=1e-5, atol=1e-4)
  tip = np.asarray(transfer.tip_adapter_logits(sx, sy, fq, bad, 5, 20.0, 0.0, 1.0, 3.0, gate=True))
  cache = 20.0 * np.exp(-3.0 * (1 - fq @ sx.T)) @ np.eye(5)[sy]
  np.testing.assert_allclose(tip, cache, rtol=1e-5, atol=1e-4)


def _loo_nll_reference(fs, ys, text, n_way, scale, a):
  """Leave-one-out log-loss of the mixed head, by removing each example in turn (numpy)."""
  fs, text = fs.astype(np.float64), text.astype(np.float64)
  text = text / np.linalg.norm(text, axis=-1, keepdims=True)
  total = 0.0
  for i in range(len(ys)):
    keep = np.arange(len(ys)) != i
    c = np.stack([fs[keep & (ys == j)].mean(0) for j in range(n_way)])
    proto = 2 * c @ fs[i] - (c * c).sum(-1)
    logits = scale * ((1 - a) * text @ fs[i] + a * proto)
    logits -= logits.max()
    total -= logits[ys[i]] - np.log(np.exp(logits).sum())
  return total / len(ys)


def test_support_cv_weight_is_the_leave_one_out_argmin():
  weights = (1.0, 0.75, 0.5, 0.25, 0.0)
  for seed in range(4):
    fs, ys, _, _, text = _task(seed, k=3)
    losses = [_loo_nll_reference(fs, ys, text, 5, 10.0, a) for a in weights]
    got = float(transfer.support_cv_weight(fs, ys, text, 5, 10.0, weights))
    assert got == weights[int(np.argmin(losses))], (seed, losses)


def test_support_cv_weight_trusts_whichever_classifier_the_support_set_supports():
  rng = np.random.default_rng(0)
  norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  centres = norm(rng.normal(size=(5, 16)))
  ys = np.repeat(np.arange(5), 3).astype(np.int32)
  weights = (1.0, 0.5, 0.0)
  # Tight shots, names pointing at the wrong classes: the prototypes.
  tight = norm(centres[ys] + 0.05 * rng.normal(size=(15, 16))).astype(np.float32)
  wrong = np.roll(centres, 1, axis=0).astype(np.float32)
  assert float(transfer.support_cv_weight(tight, ys, wrong, 5, 20.0, weights)) == 1.0
  # Shots scattered (a left-out shot is far from its class's other shots), names exact:
  # the zero-shot classifier.
  loose = norm(centres[ys] + 1.5 * rng.normal(size=(15, 16))).astype(np.float32)
  exact = norm(np.stack([loose[ys == j].mean(0) for j in range(5)])).astype(np.float32)
  assert float(transfer.support_cv_weight(loose, ys, exact, 5, 20.0, weights)) == 0.0


def test_proto_zeroshot_adapt_with_one_cv_weight_is_that_weight():
  fs, ys, fq, _, text = _task(7, k=2)
  for w in (1.0, 0.3):
    fixed = transfer.proto_zeroshot_adapt(fs, ys, fq, text, 5, 20.0, -1.0, w, 5, 0.5)
    cv = transfer.proto_zeroshot_adapt(fs, ys, fq, text, 5, 20.0, -1.0, 0.9, 5, 0.5,
                                       gate=True, cv_weights=(w,))
    np.testing.assert_allclose(np.asarray(cv), np.asarray(fixed), rtol=1e-5, atol=1e-5)


def test_selection_pools_train_classes_or_own_classes():
  from fszjax.fewshot.episodes import SplitData
  from fszjax.fewshot.towers import selection_pools

  def split(names, labels, fonts):
    n = len(labels)
    return SplitData(np.arange(n, dtype=np.float32)[:, None], np.asarray(labels),
                     np.zeros(n, np.int64), np.eye(len(names), dtype=np.float32), np.zeros((n, 1)),
                     list(names), list(fonts))

  train = split(["a", "b", "c"], [0, 1, 2, 0], ["f1", "f1", "f1", "f2"])
  # val of train classes (Glyphs' val): queries relabelled into train's label space,
  # supports and text from train.
  val = split(["c", "a"], [0, 1], ["f3", "f3"])
  p = selection_pools(train, val)
  np.testing.assert_array_equal(p["query"][1], [2, 0])
  assert p["support"][0] is train.feats and p["text"] is train.text
  # val of its own classes (val_classes): everything from val itself.
  own = split(["x", "y"], [0, 1, 1], ["f1", "f1", "f2"])
  p = selection_pools(train, own)
  assert p["support"][0] is own.feats and p["query"][0] is own.feats and p["text"] is own.text
  np.testing.assert_array_equal(p["query"][2], ["f1", "f1", "f2"])


def test_cross_font_episodes_support_in_other_fonts():
  sl = np.repeat(np.arange(6), 3)
  sd = np.tile(np.array(["a", "b", "c"]), 6)
  ql = np.arange(6)
  qd = np.array(["a", "b", "c", "a", "b", "c"])
  eps = transfer.cross_font_episodes(sl, sd, ql, qd, n_way=4, k_shot=2, episodes=7, seed=0)
  assert eps["support"].shape == (7, 8) and eps["query"].shape == (7, 4)
  for t in range(7):
    for j in range(4):
      c = eps["classes"][t, j]
      q = eps["query"][t, j]
      assert ql[q] == c
      sup = eps["support"][t][eps["support_y"][t] == j]
      assert len(set(sup)) == 2 and all(sl[s] == c and sd[s] != qd[q] for s in sup)
  assert transfer.cross_font_episodes(sl, sd, ql, qd, n_way=7, k_shot=1, episodes=1, seed=0) is None


def test_select_on_val_lowest_log_loss_first_on_ties():
  cands = transfer.grid({"a": [1, 2], "b": [0, 1]})
  assert cands == [{"a": 1, "b": 0}, {"a": 1, "b": 1}, {"a": 2, "b": 0}, {"a": 2, "b": 1}]
  # Accuracy ties everywhere (the ceiling); the log-loss decides, not the order.
  nll = {(1, 0): 0.3, (1, 1): 0.2, (2, 0): 0.1, (2, 1): 0.1}
  best = transfer.select_on_val(lambda c: {"nll": nll[c["a"], c["b"]], "acc": 1.0}, cands, "t")
  assert best == {"a": 2, "b": 0, "val_nll": 0.1, "val_acc": 1.0}
  # A NaN log-loss is never chosen; all NaN is an error naming the cause.
  nan = {(1, 0): float("nan"), (1, 1): 0.5, (2, 0): float("nan"), (2, 1): 0.7}
  got = transfer.select_on_val(lambda c: {"nll": nan[c["a"], c["b"]], "acc": 0.5}, cands, "t")
  assert got["a"] == 1 and got["b"] == 1
  with pytest.raises(FloatingPointError, match="NaN"):
    transfer.select_on_val(lambda c: {"nll": float("nan"), "acc": 0.0}, cands, "t")
  with pytest.raises(ValueError, match="no candidates"):
    transfer.select_on_val(lambda c: {"nll": 0.0, "acc": 0.0}, [], "t")


def test_feature_scores_log_loss_matches_numpy():
  fs, ys, fq, yq, text = _task(5)
  st = lambda x: np.stack([x, x])
  out = transfer.make_feature_scores(5, 20.0, 0.0, 1.0, 0, 0.5, 0.0, 1.0, False)(
      st(fs), st(ys), st(fq), st(yq), st(text))
  lg = 20.0 * np.asarray(_proto_logits(fs, ys, fq, 5), np.float64)
  lg = lg - lg.max(1, keepdims=True)
  logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
  want = -np.mean(logp[np.arange(len(yq)), yq])
  np.testing.assert_allclose(np.asarray(out["proto_zs_adapt"]["nll"]), [want] * 2, rtol=1e-4)
  acc = np.mean(np.argmax(lg, 1) == yq)
  np.testing.assert_allclose(np.asarray(out["proto_zs_adapt"]["acc"]), [acc] * 2, atol=1e-6)


def _tiny_features():
  from fszjax.models.vit import ViT

  tower = ViT(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=4, embed_dim=8,
              pool="gap", stem=(4, 8))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(10, 8, 8, 1)), jnp.float32)
  params = tower.init(jax.random.key(0), x[:1])["params"]
  return tower, params, x


def test_conv_stem_grid_and_params():
  tower, params, x = _tiny_features()
  z, extra = tower.apply({"params": params}, x)
  assert z.shape == (10, 8) and extra["tokens"].shape == (10, 4, 16)
  assert set(params["stem"]) == {"s0", "n0", "s1", "n1", "embedding"}
  assert "embedding" not in params  # the patch convolution is replaced
  assert stem_lib.layer_plan(4, (4, 8, 8)) == [(4, 2), (8, 2), (8, 1)]
  assert stem_lib.layer_plan(8, (4, 8)) == [(4, 2), (8, 2), (8, 2)]  # last width repeats
  for bad in ((6, (4, 8)), (8, ())):
    try:
      stem_lib.layer_plan(*bad)
    except ValueError:
      continue
    raise AssertionError(f"{bad} accepted")


def test_tower_finetune_and_lp_ft():
  tower, params, x = _tiny_features()
  feats = lambda p, xx: inner.l2_normalize(tower.apply({"params": p}, xx)[0])
  ys = np.array([0, 1, 0, 1, 2], np.int32)
  text = np.asarray(feats(params, x[:3]))
  task = {"support_x": x[:5], "support_y": ys, "query_x": x[:5], "text_emb": text}
  # 0 steps: tower_finetune's logits are proto_zeroshot_head's.
  got = transfer.tower_finetune(feats, params, task, n_way=3, scale=10.0, bias=0.0,
                                proto_weight=0.5, steps=0, lr=0.1, adapt=1)
  fs = feats(params, x[:5])
  want = transfer.proto_zeroshot_adapt(fs, ys, fs, text, 3, 10.0, 0.0, 0.5, 0, 0.1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  loss = lambda lg: float(inner.cross_entropy(lg, ys))
  tuned = transfer.tower_finetune(feats, params, task, n_way=3, scale=10.0, bias=0.0,
                                  proto_weight=0.5, steps=10, lr=0.05, adapt=1)
  assert loss(tuned) < loss(got)
  lp = lambda ft_steps: transfer.lp_ft(feats, params, task, n_way=3, scale=10.0, lp_steps=20,
                                       lp_lr=0.05, ft_steps=ft_steps, ft_lr=0.002, adapt="all")
  probe_only, lpft = lp(0), lp(5)
  # 0 fine-tuning steps: the linear probe (from zeros: below chance loss after fitting).
  assert loss(probe_only) < float(np.log(3.0))
  assert loss(lpft) < loss(probe_only)
