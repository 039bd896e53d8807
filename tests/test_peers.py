"""benchmarks/peers.py: the same work on both sides, no ratio when the settings differ."""

import importlib.util
import os

import jax
import jax.numpy as jnp

from fszjax.fewshot import bench as fbench

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "peers.py")
_spec = importlib.util.spec_from_file_location("fszjax_bench_peers", _PATH)
peers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peers)


def _run(rate_fz, rate_peers, settings_fz, settings_peer, work="train"):
  per = {"train": 64, "encode": 32, "maml": 32}[work]
  runs = {work: {"fszjax": [{"step_s": per / rate_fz, "settings": settings_fz}]}}
  for t, r in rate_peers.items():
    runs[work][f"peer_t{t}"] = [{"step_s": per / r, "settings": settings_peer}]
  return peers._summarise(runs, [work], list(rate_peers))["workloads"][work]


def test_ratio_against_the_best_thread_setting():
  s = {"batch": 64, "params": 10}
  e = _run(80.0, {1: 30.0, 2: 50.0}, s, dict(s))
  assert e["best_peer"] == "peer_t2"
  assert e["ratio"] == 1.6


def test_no_ratio_when_settings_differ():
  e = _run(80.0, {1: 30.0, 2: 50.0}, {"batch": 64}, {"batch": 32})
  assert e["ratio"] is None
  assert "settings differ" in e["refused"]
  assert "refused" in peers._table({"workloads": {"train": e}})


def test_maml_setting_is_learn2learns_and_bench_adapt_default():
  assert peers.MAML == fbench.LEARN2LEARN_SETTING
  s = fbench.resolve_settings()
  assert fbench.learn2learn_differences(s) == {}
  diff = fbench.learn2learn_differences(fbench.resolve_settings(n_way=20))
  assert diff == {"n_way": (20, 5)}
  assert "NOT learn2learn" in fbench._l2l_note(fbench.resolve_settings(n_way=20))


def test_train_workload_is_the_issue_model():
  from fszjax.convert import open_clip as oc
  from fszjax.models.two_tower import build_model

  model = build_model(oc.fszjax_model_config(peers.TRAIN_OC_CFG))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                          jnp.zeros((1, 32), jnp.int32))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 19_308_545
