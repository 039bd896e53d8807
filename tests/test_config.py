"""Config loading, overrides and validation."""

import os

import pytest

from fszjax import cli, config as config_lib

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
