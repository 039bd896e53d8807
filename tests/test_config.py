"""Config loading, overrides and validation."""

import os

import pytest

from fszjax import cli, config as config_lib
from helpers import config_file_on

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["glyphs", "siglip_b16", "clip_b16", "lit_b16"])
def test_shipped_configs_load_and_build(name):
  from fszjax.models.two_tower import build_model

  cfg = config_lib.load_config(os.path.join(ROOT, "configs", f"{name}.py"))
  model = build_model(cfg.model)
  assert model.img.embed_dim == cfg.model.embed_dim
  assert cfg.loss in ("clip", "siglip")
  if name == "lit_b16":
    assert cfg.optim.freeze == ["^img/"] and cfg.init_keys == "^img/"


def test_overrides_types_and_nesting():
  cfg = config_lib.load_config(os.path.join(ROOT, "configs/glyphs.py"), [
      "--config.loss=clip", "--config.mesh.data=2", "--config.optim.lr=3e-4",
      "--config.model.scan_layers=true", "--config.optim.freeze=['^img/']"])
  assert cfg.loss == "clip" and cfg.mesh.data == 2 and cfg.optim.lr == 3e-4
  assert cfg.model.scan_layers is True and list(cfg.optim.freeze) == ["^img/"]


def test_unknown_key_suggests_closest():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load_config(os.path.join(ROOT, "configs/glyphs.py"), ["--config.mesh.dta=2"])
  assert "unknown config key config.mesh.dta" in str(e.value)
  assert "config.mesh.data" in str(e.value)


def test_bad_values_are_one_line_errors():
  path = os.path.join(ROOT, "configs/glyphs.py")
  with pytest.raises(config_lib.ConfigError, match="expected an integer"):
    config_lib.load_config(path, ["--config.batch_size=lots"])
  with pytest.raises(config_lib.ConfigError, match="use one of"):
    config_lib.load_config(path, ["--config.loss=triplet"])
  with pytest.raises(config_lib.ConfigError, match="needs a logit bias"):
    config_lib.load_config(path, ["--config.loss=siglip", "--config.model.logit_bias=false"])
  with pytest.raises(config_lib.ConfigError, match="not divisible by config.grad_accum"):
    config_lib.load_config(path, ["--config.grad_accum=3"])
  with pytest.raises(config_lib.ConfigError, match="not found"):
    config_lib.load_config("configs/nope.py")


def test_cli_splits_overrides_anywhere():
  overrides, rest = config_lib.split_overrides(
      ["bench", "pretrain", "--config.loss", "clip", "--config", "c.py", "--config.mesh.data=2"])
  assert overrides == [("loss", "clip"), ("mesh.data", "2")]
  assert rest == ["bench", "pretrain", "--config", "c.py"]


SHIPPED = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_validates(name):
  cfg = config_lib.load_config(os.path.join(ROOT, "configs", f"{name}.py"))
  assert cfg.name == name


def test_sharding_rules_defined_once():
  """The rules table lives in fszjax/config_defaults.py only; every pretraining config holds
  exactly that table."""
  from fszjax import config_defaults

  holders = []
  for d in ("configs", "fszjax"):
    for dirpath, _, files in os.walk(os.path.join(ROOT, d)):
      for f in files:
        if f.endswith(".py") and '["act_kv", None]' in open(os.path.join(dirpath, f)).read():
          holders.append(f)
  assert holders == [], holders  # the table is written as tuples in config_defaults
  src = open(os.path.join(ROOT, "fszjax", "config_defaults.py")).read()
  assert src.count('("act_kv", None)') == 1
  for name in SHIPPED:
    cfg = config_lib.load_config(os.path.join(ROOT, "configs", f"{name}.py"))
    if "model" in cfg:
      assert cfg.sharding_rules == config_defaults.sharding_rules()
  assert ["batch", ["data", "fsdp"]] in config_defaults.sharding_rules()


def test_configs_import_siblings_as_python(tmp_path):
  """A config imports the config next to it (`import siglip_b16`); a sibling of the same
  name in another directory is not mixed up with it."""
  (tmp_path / "parent.py").write_text(
      "import ml_collections\n\ndef get_config(arg=None):\n"
      "  return ml_collections.ConfigDict(dict(name='p', seed=7))\n")
  (tmp_path / "child.py").write_text(
      "import parent\n\ndef get_config(arg=None):\n"
      "  c = parent.get_config()\n  c.name = 'child'\n  return c\n")
  cfg = config_lib.load_config(str(tmp_path / "child.py"))
  assert cfg.name == "child" and cfg.seed == 7
  assert "parent" not in __import__("sys").modules
  clip = config_lib.load_config(os.path.join(ROOT, "configs", "clip_b16.py"))
  assert clip.loss == "clip" and clip.batch_size == 32_768 and clip.model.image.pool == "tok"


def test_config_file_with_unknown_key_names_the_closest(tmp_path):
  bad = config_file_on(tmp_path / "typo.py", "glyphs", "c.optim.warmup_step = 10",
                       "c.data.anything = 1")
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load_config(bad)
  msg = str(e.value)
  assert "unknown config key config.optim.warmup_step" in msg and "\n" not in msg
  assert "did you mean config.optim.warmup_steps?" in msg
  ok = config_file_on(tmp_path / "ok.py", "glyphs", "c.data.anything = 1")
  assert config_lib.load_config(ok).data.anything == 1  # data: a free-form section
