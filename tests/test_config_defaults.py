"""One source of config defaults (fszjax/config_defaults.py): the adapt configs start from
`adapt_config`, every key is validated at load time, and a saved config.json written before
a key existed is filled from the defaults."""

import json
import os

import ml_collections
import pytest

from fszjax import config as config_lib, config_defaults
from helpers import config_file_on

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAPT = ["glyphs_fewshot", "glyphs_maml_conv4"]


def _path(name):
  return os.path.join(ROOT, "configs", f"{name}.py")


def _keys(cfg):
  return {k for k in config_lib._flat_keys(cfg) if k.split(".")[0] not in config_lib.FREE_FORM}


@pytest.mark.parametrize("name", ADAPT)
def test_adapt_config_keys_are_the_defaults(name):
  """Every key a shipped adapt config sets exists in `adapt_config`, and it holds them all."""
  raw = config_lib.load_config_file(_path(name))
  defaults = _keys(config_defaults.adapt_config(ml_collections.ConfigDict()))
  assert _keys(raw) == defaults
  assert config_lib.defaults_for(raw)[1] == "adapt_config"


def test_adapt_configs_keep_their_values():
  """The values the adapt configs held before they derived from the defaults."""
  few = config_lib.load_config(_path("glyphs_fewshot"))
  assert few.fewshot.backbone == "towers" and few.fewshot.episode_batch == 200
  assert few.fewshot.meta.algorithm == "protonet" and few.fewshot.meta.adapt == "head"
  assert few.fewshot.meta.train_setting == "20way1shot" and few.fewshot.meta.q_query == 2
  assert few.fewshot.meta.outer_lr == 3e-4 and few.fewshot.meta.remat is False
  assert few.checkpoint.save_every == 50 and few.data.name is None
  conv = config_lib.load_config(_path("glyphs_maml_conv4"))
  m = conv.fewshot.meta
  assert conv.fewshot.backbone == "conv4" and conv.fewshot.image_size == 28
  assert conv.fewshot.eval_chunk == 5 and conv.checkpoint.save_every == 100
  assert (m.algorithm, m.adapt, m.train_setting, m.q_query, m.meta_batch, m.steps) == (
      "maml", "all", "20way1shot", 3, 8, 150)
  assert (m.inner_steps, m.inner_lr, m.eval_inner_steps, m.eval_inner_lr) == (5, 0.4, 5, 0.1)
  assert (m.head_init, m.hidden, m.task_chunk, m.formulation, m.pool, m.rotations) == (
      "zeros", 64, 4, "im2col", "flatten", [0])
  assert m.remat is True and m.devices == 0 and m.outer_schedule == "constant"
  assert conv.data.name == "glyphs" and conv.data.augment.affine is False


@pytest.mark.parametrize("name", ADAPT)
def test_adapt_checkpoint_section_has_the_loop_keys(name):
  """The training loop reads the same ``checkpoint`` keys (and ``progress``) of both kinds
  of config; meta-training's: synchronous saves, no best-checkpoint tracking."""
  pre = config_defaults.pretrain_config(ml_collections.ConfigDict())
  cfg = config_lib.load_config(_path(name))
  assert set(cfg.checkpoint.keys()) == set(pre.checkpoint.keys())
  c = cfg.checkpoint
  assert (c.async_save, c.best_metric, c.best_mode, c.spike_factor, c.on_save_error) == (
      False, "", "max", 10.0, "stop")
  assert cfg.progress is True


def test_meta_training_refuses_a_best_metric():
  from fszjax.fewshot import episodes, meta_loop

  cfg = config_lib.load_config(_path("glyphs_maml_conv4"), ["--config.checkpoint.best_metric=acc"])
  with pytest.raises(episodes.AdaptError) as e:
    meta_loop.meta_train(cfg, "unused", None, None, None, None)
  assert "\n" not in str(e.value) and "config.checkpoint.best_metric='acc'" in str(e.value)


def test_unknown_adapt_key_is_one_line_naming_the_closest(tmp_path):
  bad = config_file_on(tmp_path / "typo.py", "glyphs_maml_conv4", "c.fewshot.meta.inner_step = 3")
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load_config(bad)
  msg = str(e.value)
  assert "\n" not in msg and "unknown config key config.fewshot.meta.inner_step" in msg
  assert "did you mean config.fewshot.meta.inner_steps?" in msg and "adapt_config" in msg
  with pytest.raises(config_lib.ConfigError, match="config.fewshot.meta.pool"):
    config_lib.load_config(_path("glyphs_maml_conv4"), ["--config.fewshot.meta.pol=mean"])
  with pytest.raises(config_lib.ConfigError, match="use one of"):
    config_lib.load_config(_path("glyphs_fewshot"), ["--config.fewshot.backbone=resnet"])


def _saved(tmp_path, name, drop):
  """A config.json of `name` as written before the dotted keys `drop` existed."""
  d = config_lib.portable_dict(config_lib.load_config(_path(name)), str(tmp_path))
  for key in drop:
    *parents, leaf = key.split(".")
    node = d
    for p in parents:
      node = node[p]
    del node[leaf]
  path = tmp_path / "config.json"
  path.write_text(json.dumps(d))
  return str(path)


def test_old_saved_pretraining_config_is_filled(tmp_path):
  from fszjax.models.two_tower import build_model

  path = _saved(tmp_path, "glyphs", ["model.image.stem", "inference", "checkpoint.spike_factor",
                                     "checkpoint.on_save_error", "eval"])
  cfg = config_lib.load_config(path)
  # A missing stem meant the plain patch embedding; other keys get today's default.
  assert tuple(cfg.model.image.stem) == ()
  assert build_model(cfg.model).img.stem == ()
  assert cfg.inference.resize_mode == "center" and cfg.inference.source == "fszjax"
  assert cfg.checkpoint.spike_factor == 10.0 and cfg.checkpoint.on_save_error == "stop"
  assert tuple(cfg.eval.splits) == () and cfg.eval.batch_size == 256  # () = data.eval_splits
  # What the config holds is kept.
  assert cfg.model.image.patch_size == 16 and cfg.loss == "clip"  # configs/glyphs.py's


def test_old_saved_adapt_config_is_filled(tmp_path):
  path = _saved(tmp_path, "glyphs_maml_conv4",
                ["fewshot.meta.pool", "fewshot.meta.layers", "fewshot.eval_chunk", "bench"])
  cfg = config_lib.load_config(path)
  assert cfg.fewshot.meta.pool == "mean" and cfg.fewshot.meta.layers == 4
  assert cfg.fewshot.eval_chunk == 0 and cfg.bench.steps == 10
  assert cfg.fewshot.meta.eval_inner_lr == 0.1  # kept


def test_fill_defaults_leaves_other_dicts_and_data_alone():
  plain = ml_collections.ConfigDict(dict(name="p", seed=7))
  config_lib.fill_defaults(plain)
  assert set(plain.keys()) == {"name", "seed"}
  partial = ml_collections.ConfigDict(dict(fewshot=dict(backbone="conv4"), data=dict(name="x")))
  config_lib.fill_defaults(partial)
  assert partial.fewshot.meta.hidden == 64 and set(partial.data.keys()) == {"name"}


def test_bench_adapt_reads_the_adapt_configs():
  from fszjax.fewshot import bench

  conv = config_lib.load_config(_path("glyphs_maml_conv4"), ["--config.fewshot.meta.hidden=8"])
  s = bench.resolve_settings(conv)
  assert (s["n_way"], s["k_shot"], s["q_query"], s["meta_batch"]) == (20, 1, 3, 8)
  assert (s["hidden"], s["pool"], s["formulation"], s["task_chunk"]) == (8, "flatten", "im2col", 4)
  assert "NOT learn2learn" in bench._l2l_note(s)
  # The default workload is an adapt config too: every key known, learn2learn's setting.
  l2l = bench.learn2learn_config()
  config_lib.check_keys(l2l, "learn2learn_config")
  assert bench.learn2learn_differences(bench.settings_of(l2l)) == {}
  with pytest.raises(config_lib.ConfigError, match="config.fewshot.meta.hidden"):
    bench.bench_config({"fewshot": {"hidden": 4}})
  with pytest.raises(bench.BenchError, match="adapt config"):
    bench.bench_config(config_lib.load_config(os.path.join(ROOT, "configs", "glyphs.py")))
