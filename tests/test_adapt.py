"""`fszjax adapt` end to end on a reduced Glyphs build: frozen-tower methods, DG, Conv-4."""

import json
import os

import numpy as np
import pytest

import data_testlib
from fszjax import config as config_lib, pretrain
from fszjax.data import errors as data_errors
from fszjax.fewshot import adapt, episodes, meta_loop, scratch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pretrained(gdir, tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("pre"))
  cfg = config_lib.load_config(os.path.join(ROOT, "configs/glyphs.py"), [
      f"--config.data.data_dir={gdir}",
      *data_testlib.tiny_run_overrides(total_steps=4, max_examples=32)])
  pretrain.train(cfg, wd)
  return wd


def _towers_cfg(gdir, pre, *extra):
  return config_lib.load_config(os.path.join(ROOT, "configs/glyphs_fewshot.py"), [
      f"--config.init_from={pre}", f"--config.data.data_dir={gdir}",
      "--config.fewshot.splits=['test_classes', 'test_fonts']",
      "--config.fewshot.settings=['5way1shot', '5way5shot']", "--config.fewshot.episodes=40",
      "--config.fewshot.q_query=2", "--config.fewshot.dg.steps=3", "--config.fewshot.dg.batch_size=16",
      "--config.fewshot.dg.settings=['5way1shot']", "--config.fewshot.probe_steps=5",
  ] + list(extra))


def test_towers_results_and_zero_step_adaptation_equals_zeroshot(gdir, pretrained, tmp_path):
  wd = str(tmp_path / "a")
  cfg = _towers_cfg(gdir, pretrained, "--config.fewshot.head_steps=0",
                    "--config.fewshot.meta.steps=0", "--config.fewshot.meta.algorithm=anil")
  res = adapt.run(cfg, wd)
  saved = json.load(open(os.path.join(wd, "results.json")))
  assert set(saved["methods"]) >= {"zeroshot", "protonet", "linear_probe", "zs_head_adapt",
                                   "wise_ft", "pixels_protonet"}
  for split in ("test_classes", "test_fonts"):
    r = saved["methods"]["zeroshot"][split]["5way1shot"]
    assert r["episodes"] == 40 and 0.0 <= r["mean"] <= 1.0 and r["ci95"] >= 0.0
    # 0 inner steps: the adapted head *is* the zero-shot classifier, episode by episode.
    assert res["methods"]["zs_head_adapt"][split]["5way1shot"] == r
    # 0 meta-steps: the re-encoded splits give the pretrained tower's results exactly.
    for setting in res["methods"]["zeroshot"][split]:
      assert res["methods"]["anil"][split][setting] == res["methods"]["zs_head_adapt"][split][setting]
      assert res["methods"]["anil_zeroshot"][split][setting] == res["methods"]["zeroshot"][split][setting]
  dg = saved["dg"]
  assert set(dg["zeroshot"]) >= {"pretrained", "finetune", "mldg", "wise_ft_0.5"}
  assert os.path.exists(os.path.join(wd, "results.md"))
  assert os.path.exists(os.path.join(wd, "accuracy_vs_shots.png"))


def test_transfer_selected_on_val_classes_by_log_loss(gdir, pretrained, tmp_path):
  """The transfer methods' hyper-parameters come from val_classes (characters never trained
  on), by val log-loss; with 5 shots the prototype / zero-shot mix is chosen per task on the
  support set, so val chooses only steps and rate. A missing selection split is one line."""
  extra = ["--config.fewshot.dg.enabled=False", "--config.fewshot.meta.enabled=False",
           "--config.fewshot.transfer.val_episodes=20", "--config.fewshot.transfer.steps=[0, 5]",
           "--config.fewshot.transfer.proto_weights=[1.0, 0.0]"]
  res = adapt.run(_towers_cfg(gdir, pretrained, *extra), str(tmp_path / "t"))
  sel = res["transfer_selection"]
  one, five = sel["5way1shot"]["proto_zs_adapt"], sel["5way5shot"]["proto_zs_adapt"]
  assert one["proto_weight"] in (1.0, 0.0) and one["steps"] in (0, 5)
  assert "proto_weight" not in five and five["support_cv_weights"] == [1.0, 0.0]
  for chosen in (one, five, sel["5way1shot"]["tip_adapter"]):
    assert np.isfinite(chosen["val_nll"]) and 0.0 <= chosen["val_acc"] <= 1.0
  # Every cell the frozen-tower table has (test_fonts 5w5s is too small on this build).
  assert "5way5shot" in res["methods"]["protonet"]["test_classes"]
  for split, cells in res["methods"]["protonet"].items():
    assert set(res["methods"]["proto_zs_adapt"][split]) == set(cells), split
  with pytest.raises(episodes.AdaptError, match="transfer.val_split"):
    adapt.run(_towers_cfg(gdir, pretrained, *extra, "--config.fewshot.transfer.val_split=nope"),
              str(tmp_path / "n"))


def test_per_episode_tower_finetuning_in_the_job(gdir, pretrained, tmp_path):
  """fewshot.transfer.finetune: with 0 fine-tuning steps from the ProtoNets head,
  tower_finetune on the images is ProtoNets on the same episodes; with steps it runs LP-FT
  and tower fine-tuning, chosen on val_classes by log-loss; bad entries are one line."""
  base = ["--config.fewshot.dg.enabled=False", "--config.fewshot.meta.enabled=False",
          "--config.fewshot.transfer.val_episodes=10", "--config.fewshot.transfer.steps=[0]",
          "--config.fewshot.transfer.finetune.enabled=True",
          "--config.fewshot.transfer.finetune.episodes=40",
          "--config.fewshot.transfer.finetune.val_episodes=4",
          "--config.fewshot.transfer.finetune.task_chunk=8"]
  res = adapt.run(_towers_cfg(gdir, pretrained, *base,
                              "--config.fewshot.transfer.finetune.methods=['tower_finetune']",
                              "--config.fewshot.transfer.finetune.steps=[0]",
                              "--config.fewshot.transfer.finetune.adapts=['all']"),
                  str(tmp_path / "f0"))
  for split, cells in res["methods"]["protonet"].items():
    for setting, summary in cells.items():
      got = res["methods"]["tower_finetune"][split][setting]
      assert got["episodes"] == summary["episodes"] == 40
      assert got["mean"] == pytest.approx(summary["mean"], abs=1e-6), (split, setting)
  res = adapt.run(_towers_cfg(gdir, pretrained, *base,
                              "--config.fewshot.transfer.finetune.steps=[2]",
                              "--config.fewshot.transfer.finetune.lp_steps=3",
                              "--config.fewshot.transfer.finetune.episodes=6",
                              "--config.fewshot.transfer.finetune.adapts=['1', 'all']"),
                  str(tmp_path / "f2"))
  for m in ("tower_finetune", "lp_ft"):
    chosen = res["finetune_selection"]["5way1shot"][m]
    assert chosen["adapt"] in (1, "all") and np.isfinite(chosen["val_nll"])
    assert res["methods"][m]["test_classes"]["5way1shot"]["episodes"] == 6
  with pytest.raises(episodes.AdaptError, match="finetune.adapts"):
    adapt.run(_towers_cfg(gdir, pretrained, *base,
                          "--config.fewshot.transfer.finetune.adapts=['last']"), str(tmp_path / "b"))


def test_towers_fomaml_over_the_last_block(gdir, pretrained, tmp_path):
  """MAML-style meta-training whose inner loop adapts the last block + the zero-shot head:
  evaluated by that inner loop on each episode's images. 0 meta-steps and 0 inner steps is
  the zero-shot classifier, episode for episode; with steps it meta-trains and evaluates."""
  base = ["--config.fewshot.dg.enabled=False", "--config.fewshot.transfer.enabled=False",
          "--config.fewshot.settings=['5way1shot']", "--config.fewshot.meta.algorithm=fomaml",
          "--config.fewshot.meta.adapt=1", "--config.fewshot.meta.train_setting=5way1shot",
          "--config.fewshot.meta.q_query=1", "--config.fewshot.meta.meta_batch=2",
          "--config.fewshot.transfer.finetune.episodes=40",
          "--config.fewshot.transfer.finetune.task_chunk=20"]
  r0 = adapt.run(_towers_cfg(gdir, pretrained, *base, "--config.fewshot.meta.steps=0",
                             "--config.fewshot.head_steps=0"), str(tmp_path / "m0"))
  for split, cells in r0["methods"]["zeroshot"].items():
    got = r0["methods"]["fomaml"][split]["5way1shot"]
    assert got["episodes"] == 40
    assert got["mean"] == pytest.approx(cells["5way1shot"]["mean"], abs=1e-6), split
  r2 = adapt.run(_towers_cfg(gdir, pretrained, *base, "--config.fewshot.meta.steps=2",
                             "--config.fewshot.head_steps=2",
                             "--config.fewshot.transfer.finetune.episodes=6"), str(tmp_path / "m2"))
  assert r2["meta_training"]["steps"] == 2
  assert r2["methods"]["fomaml"]["test_classes"]["5way1shot"]["episodes"] == 6
  with pytest.raises(episodes.AdaptError, match="meta.adapt"):
    adapt.run(_towers_cfg(gdir, pretrained, *base, "--config.fewshot.meta.adapt=last"),
              str(tmp_path / "bad"))


def test_missing_init_from_is_one_line_error(gdir, tmp_path):
  cfg = _towers_cfg(gdir, "/no/such/run")
  with pytest.raises(episodes.AdaptError, match="does not exist"):
    adapt.run(cfg, str(tmp_path / "b"))
  with pytest.raises(episodes.AdaptError, match="like '5way1shot'"):
    episodes.parse_setting("5-way")


def test_conv4_meta_training_resumes(gdir, tmp_path):
  base = [f"--config.data.data_dir={gdir}", f"--config.data.glyphs.max_chars={data_testlib.GLYPH_MAX_CHARS}",
          "--config.fewshot.splits=['test_classes']", "--config.fewshot.settings=['5way1shot']",
          "--config.fewshot.episodes=20", "--config.fewshot.q_query=1",
          "--config.fewshot.meta.meta_batch=4", "--config.fewshot.meta.task_chunk=2",
          "--config.fewshot.meta.hidden=8", "--config.fewshot.meta.q_query=1",
          "--config.fewshot.meta.inner_steps=1", "--config.fewshot.meta.eval_inner_steps=1",
          "--config.log_every=1", "--config.checkpoint.save_every=2"]
  path = os.path.join(ROOT, "configs/glyphs_maml_conv4.py")
  straight = str(tmp_path / "straight")
  r1 = adapt.run(config_lib.load_config(path, base + ["--config.fewshot.meta.steps=4"]), straight)
  resumed = str(tmp_path / "resumed")
  adapt.run(config_lib.load_config(path, base + ["--config.fewshot.meta.steps=2",
                                                 "--config.fewshot.splits=[]"]), resumed)
  r2 = adapt.run(config_lib.load_config(path, base + ["--config.fewshot.meta.steps=4"]), resumed)
  a = r1["methods"]["conv4_maml"]["test_classes"]["5way1shot"]
  b = r2["methods"]["conv4_maml"]["test_classes"]["5way1shot"]
  assert a == b  # same episodes, same meta-parameters after resuming at step 2
  assert "pixels_protonet_28px" in r1["methods"]


def test_towers_meta_training_changes_the_tower_and_resumes(gdir, pretrained, tmp_path, caplog):
  from fszjax import checkpoint

  wd = str(tmp_path / "m")
  extra = ["--config.fewshot.dg.enabled=False", "--config.fewshot.settings=['5way1shot']",
           "--config.fewshot.meta.train_setting=5way1shot", "--config.fewshot.meta.q_query=1",
           "--config.fewshot.meta.meta_batch=2", "--config.fewshot.meta.outer_lr=1e-2",
           "--config.fewshot.head_steps=2", "--config.checkpoint.save_every=2",
           "--config.log_every=1", "--config.fewshot.meta.algorithm=anil"]
  r1 = adapt.run(_towers_cfg(gdir, pretrained, *extra, "--config.fewshot.meta.steps=2"), wd)
  assert r1["meta_training"]["steps"] == 2 and {"anil", "anil_zeroshot"} <= set(r1["methods"])
  ck = checkpoint.Checkpointer(os.path.join(wd, "meta_checkpoints"), read_only=True)
  assert max(ck.all_steps()) == 2
  trained = checkpoint.load_params_numpy(os.path.join(wd, "meta_checkpoints", "2"))
  before = checkpoint.load_params_numpy(pretrained)["img"]
  import jax
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       trained["backbone"], before)
  assert max(jax.tree.leaves(moved)) > 1e-4  # the outer loop trained the image tower
  # A rerun restores the finished meta-training instead of redoing it: identical results.
  caplog.set_level("INFO", logger="fszjax")
  caplog.clear()
  r2 = adapt.run(_towers_cfg(gdir, pretrained, *extra, "--config.fewshot.meta.steps=2"), wd)
  assert "resumed meta-training at step 2" in caplog.text
  assert "meta step" not in caplog.text  # no meta-step ran again
  assert r2["methods"]["anil"] == r1["methods"]["anil"]


def test_towers_protonet_meta_training(gdir, pretrained, tmp_path):
  """ProtoNets meta-training of the whole image tower: 0 steps re-encodes to the frozen
  tower's ProtoNets results exactly; 3 steps move every part of the tower (stem, blocks,
  pooling head, projection) and change the results."""
  extra = ["--config.fewshot.dg.enabled=False", "--config.fewshot.transfer.enabled=False",
           "--config.fewshot.settings=['5way1shot']", "--config.fewshot.meta.algorithm=protonet",
           "--config.fewshot.meta.train_setting=5way1shot", "--config.fewshot.meta.q_query=1",
           "--config.fewshot.meta.meta_batch=2", "--config.fewshot.meta.outer_lr=1e-2",
           "--config.log_every=1"]
  r0 = adapt.run(_towers_cfg(gdir, pretrained, *extra, "--config.fewshot.meta.steps=0",
                            "--config.fewshot.transfer.enabled=True",
                            "--config.fewshot.transfer.val_episodes=20"), str(tmp_path / "p0"))
  assert r0["methods"]["protonet_meta"] == r0["methods"]["protonet"]
  assert r0["methods"]["protonet_meta_zeroshot"] == r0["methods"]["zeroshot"]
  # The two-tower methods on the (unchanged) re-encoded tower: same choices, same results.
  assert r0["transfer_selection_meta"] == r0["transfer_selection"]
  for m in ("tip_adapter", "proto_zs_adapt"):
    assert r0["methods"][f"{m}_meta"] == r0["methods"][m]
  assert "anil" not in r0["methods"]
  wd = str(tmp_path / "p3")
  r3 = adapt.run(_towers_cfg(gdir, pretrained, *extra, "--config.fewshot.meta.steps=3"), wd)
  assert r3["meta_training"]["algorithm"] == "protonet"
  from fszjax import checkpoint
  import jax
  trained = checkpoint.load_params_numpy(os.path.join(wd, "meta_checkpoints", "3"))["backbone"]
  before = checkpoint.load_params_numpy(pretrained)["img"]
  moved = {k: max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), trained[k], before[k])))
      for k in before}
  assert min(moved.values()) > 1e-4, moved  # every part of the tower learned
  assert r3["methods"]["protonet_meta"] != r0["methods"]["protonet_meta"]
  assert r3["methods"]["protonet"] == r0["methods"]["protonet"]  # the frozen rows stay


def test_meta_stroke_jitter_is_seeded_per_step_and_checked_first(gdir, pretrained, tmp_path):
  from fszjax.fewshot import towers
  rng = np.random.default_rng(0)
  ep = {"support_x": (rng.random((2, 5, 8, 8, 1)) > 0.7).astype(np.float32),
        "query_x": (rng.random((2, 10, 8, 8, 1)) > 0.7).astype(np.float32),
        "support_y": np.zeros((2, 5), np.int32)}
  a, b = towers.jittered(ep, 0.5, 0, 7), towers.jittered(ep, 0.5, 0, 7)
  for k in ("support_x", "query_x"):  # a resumed run redraws the same images
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["query_x"], ep["query_x"])
  assert not np.array_equal(towers.jittered(ep, 0.5, 0, 8)["query_x"], a["query_x"])
  assert a["support_y"] is ep["support_y"] and towers.jittered(ep, 0.0, 0, 7) is ep
  # A bad probability stops `fszjax adapt` before any evaluation or training.
  with pytest.raises(data_errors.DataError, match="config.fewshot.meta.stroke=2"):
    adapt.run(_towers_cfg(gdir, pretrained, "--config.fewshot.meta.stroke=2.0"),
              str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "results.json")


def test_towers_meta_algorithm_is_checked():
  from fszjax.fewshot import towers
  cfg = config_lib.load_config(os.path.join(ROOT, "configs/glyphs_fewshot.py"),
                               ["--config.fewshot.meta.algorithm=reptile"])
  with pytest.raises(episodes.AdaptError, match="protonet, anil, fomaml, maml"):
    towers.towers_meta_cfg(cfg.fewshot, 10.0, 0.0)
  cfg.fewshot.meta.algorithm = "protonet"
  assert towers.towers_meta_cfg(cfg.fewshot, 10.0, 0.0).algorithm == "protonet"
  f = towers.tower_features_fn(
      type("T", (), {"apply": staticmethod(lambda p, x: (x, None))})(), "protonet", 8.0)
  q = f(None, np.asarray([[3.0, 4.0]], np.float32))
  np.testing.assert_allclose(np.asarray(q), [[0.6 * 2.0, 0.8 * 2.0]], rtol=1e-6)  # sqrt(8/2)


@pytest.mark.parametrize("rotations", [[0], [0, 90, 180, 270], [0, 180]])
def test_rotation_classes(rotations):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 5, 5, 1)).astype(np.float32)
  y = np.array([0, 0, 1, 1, 2, 2])
  xs, ys = scratch.rotation_classes(x, y, rotations)
  assert len(xs) == len(ys) == 6 * len(rotations)
  for i, r in enumerate(rotations):
    np.testing.assert_array_equal(xs[6 * i:6 * (i + 1)], np.rot90(x, r // 90, axes=(1, 2)))
    np.testing.assert_array_equal(ys[6 * i:6 * (i + 1)], y + 3 * i)


def test_rotation_classes_rejects_bad_angles():
  x, y = np.zeros((2, 4, 4, 1)), np.array([0, 1])
  for bad in ([45], [0, 360], []):
    with pytest.raises(episodes.AdaptError, match="multiples of 90"):
      scratch.rotation_classes(x, y, bad)


def _replace_meta(cfg, **kw):
  c = cfg.copy_and_resolve_references()
  for k, v in kw.items():
    c.fewshot.meta[k] = v
  return c


def test_meta_train_ctrl_c_saves_the_step_and_resumes_exactly(tmp_path):
  import signal

  import jax
  from fszjax import checkpoint
  from fszjax.fewshot import conv4, meta

  cfg = config_lib.load_config(os.path.join(ROOT, "configs/glyphs_maml_conv4.py"), [
      "--config.fewshot.meta.steps=5", "--config.fewshot.meta.meta_batch=2",
      "--config.fewshot.meta.devices=1",
      "--config.checkpoint.save_every=100", "--config.log_every=1"])
  mcfg = meta.MetaConfig(algorithm="maml", n_way=2, inner_steps=1, inner_lr=0.1,
                         head_init="zeros")
  features_fn = conv4.make_conv4_features_fn()
  params = conv4.init_conv4(jax.random.key(0), 2, hidden=4, image_size=28)

  def sample(step, interrupt_at=None):
    if step == interrupt_at:
      os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C arrived during this step
    r = np.random.default_rng(step)
    return {"support_x": r.normal(size=(2, 2, 28, 28, 1)).astype(np.float32),
            "support_y": np.tile(np.arange(2), (2, 1)),
            "query_x": r.normal(size=(2, 4, 28, 28, 1)).astype(np.float32),
            "query_y": np.tile(np.arange(2), (2, 2))}

  straight = meta_loop.meta_train(cfg, str(tmp_path / "a"), features_fn, mcfg, params, sample)
  # The meta-batch sharded over 2 devices gives the 1-device meta-parameters.
  sharded = meta_loop.meta_train(_replace_meta(cfg, devices=2), str(tmp_path / "s"), features_fn,
                             mcfg, params, sample)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  ck_dir = str(tmp_path / "b")
  with pytest.raises(KeyboardInterrupt):
    meta_loop.meta_train(cfg, ck_dir, features_fn, mcfg, params, lambda s: sample(s, interrupt_at=3))
  assert max(checkpoint.Checkpointer(ck_dir, read_only=True).all_steps()) == 3
  resumed = meta_loop.meta_train(cfg, ck_dir, features_fn, mcfg, params, sample)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("chunk,devices", [(0, 1), (1, 1), (3, 1), (4, 1), (0, 2), (3, 8),
                                           (4, 3)])
def test_chunked_evaluation_equals_one_vmap(chunk, devices):
  import jax.numpy as jnp

  rng = np.random.default_rng(0)
  tasks = {"a": rng.normal(size=(10, 3)).astype(np.float32),
           "b": rng.normal(size=(10, 3, 2)).astype(np.float32)}
  fn = lambda t: {"s": jnp.sum(t["a"]) * jnp.sum(t["b"]), "v": t["b"].sum(0)}
  out = episodes.chunked(lambda t, _: fn(t), chunk, devices)(tasks)
  for i in range(10):
    ref = fn({k: v[i] for k, v in tasks.items()})
    np.testing.assert_allclose(out["s"][i], ref["s"], rtol=1e-6)
    np.testing.assert_allclose(out["v"][i], ref["v"], rtol=1e-6)
  assert out["s"].shape == (10,)
  # `shared`: unbatched, the same for every task, an argument (not a constant) of the program.
  traces = []

  def scaled(t, w):
    traces.append(1)  # runs once per trace, i.e. per compiled program
    return jnp.sum(t["a"]) * w["w"]

  run = episodes.chunked(scaled, chunk, devices)
  for w in (2.0, -3.0):
    got = run(tasks, {"w": np.float32(w)})
    np.testing.assert_allclose(got, tasks["a"].sum(1) * w, rtol=1e-6)
  assert len(traces) == 1  # the second value reused the first program


def test_outer_optimizer_schedules():
  import ml_collections
  import jax.numpy as jnp

  def lr_trace(**kw):
    m = ml_collections.ConfigDict({**dict(algorithm="maml", outer_lr=0.1, steps=10,
                                          outer_schedule="constant", warmup_steps=0), **kw})
    opt = meta_loop.outer_optimizer(m)
    p = {"w": jnp.zeros(())}
    s = opt.init(p)
    out = []
    for _ in range(10):  # SGD-like probe: Adam's first update is -lr * sign(g)
      u, s = opt.update({"w": jnp.ones(())}, s, p)
      out.append(-float(u["w"]))
    return np.array(out)

  const = lr_trace()
  np.testing.assert_allclose(const, 0.1, rtol=1e-4)
  cos = lr_trace(outer_schedule="cosine", warmup_steps=2)
  assert cos[0] == 0.0 and abs(cos[2] - 0.1) < 1e-4 and np.all(np.diff(cos[2:]) < 0) and cos[-1] < 0.01
  with pytest.raises(episodes.AdaptError, match="'constant' or 'cosine'"):
    meta_loop.outer_optimizer(ml_collections.ConfigDict(dict(algorithm="maml", outer_lr=0.1, steps=10,
                                                         outer_schedule="linear")))


def test_second_ctrl_c_interrupts_at_once():
  import signal

  from fszjax import interrupt

  before = signal.getsignal(signal.SIGINT)
  with interrupt.StopRequest("test") as stop:
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGINT)  # first: only asks to stop
    assert stop.requested
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)  # second: interrupts now
      for _ in range(1000):  # (the handler runs between bytecodes)
        pass
  assert signal.getsignal(signal.SIGINT) == before  # the previous handler is back
