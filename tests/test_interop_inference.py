"""`fszjax.load` on a fszjax workdir (SentencePiece tokenizer, grayscale glyph images):
the same embeddings as the model applied directly, every accepted path form, clear errors.
Needs neither PyTorch nor open_clip."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import fszjax
from fszjax import inference
from fszjax.convert import common
from fszjax.text import sentencepiece as tokenizer_lib
from fszjax.models.two_tower import TwoTower, build_model
from helpers import tiny_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  d = tmp_path_factory.mktemp("inf")
  tok = tokenizer_lib.train_sentencepiece(
      ["latin small letter a", "latin capital letter b", "digit one", "greek small letter alpha"] * 10,
      str(d / "spm"), vocab_size=40)
  cfg = tiny_config(f"--config.data.tokenizer.path={d / 'spm.model'}",
                    "--config.model.text.vocab_size=40")
  module = build_model(cfg.model)
  shape = (1, cfg.model.image.image_size, cfg.model.image.image_size, cfg.model.image.channels)
  params = nn.unbox(module.init(jax.random.key(0), jnp.zeros(shape),
                                jnp.zeros((1, cfg.model.text.max_len), jnp.int32))["params"])
  flat = {k: np.asarray(v) for k, v in common.flatten(params).items()}
  out = common.save_converted(str(d / "run"), cfg, flat)
  return out, cfg, module, params, tok


def test_load_workdir_matches_direct_apply(workdir):
  out, cfg, module, params, tok = workdir
  model = fszjax.load(out)
  texts = ["latin small letter a", "digit one"]
  tokens = model.tokenize(texts)
  np.testing.assert_array_equal(tokens, tok.encode(texts, cfg.model.text.max_len))
  x = np.random.default_rng(0).normal(size=(3, 16, 16, 1)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    ref_i = module.apply({"params": params}, x, method=TwoTower.encode_image)
    ref_t = module.apply({"params": params}, tokens, method=TwoTower.encode_text)
  np.testing.assert_allclose(model.encode_image(x), ref_i, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.encode_text(texts), ref_t, rtol=1e-5, atol=1e-6)
  assert model.logit_bias == pytest.approx(cfg.model.logit_bias_init)
  assert model.logit_scale == pytest.approx(cfg.model.logit_scale_init, rel=1e-6)
  # Raw grayscale uint8 images of any size are resized and normalised like the pipeline.
  raw = np.random.default_rng(1).integers(0, 256, size=(20, 28)).astype(np.uint8)
  pre = model.preprocess([raw, raw])
  assert pre.shape == (2, 16, 16, 1) and pre.dtype == np.float32
  assert -1.0 <= pre.min() <= pre.max() <= 1.0
  clf = model.zero_shot_classifier(["latin small letter a", "digit one"])
  assert clf.shape == (2, cfg.model.embed_dim)


def test_load_accepts_checkpoint_paths(workdir):
  out = workdir[0]
  a = fszjax.load(out).params
  for p in (os.path.join(out, "checkpoints"), os.path.join(out, "checkpoints", "0")):
    b = fszjax.load(p).params
    chex.assert_trees_all_equal(a, b)


def test_load_errors_name_the_fix(tmp_path, workdir):
  with pytest.raises(inference.LoadError, match="does not exist; pass a fszjax workdir"):
    fszjax.load(str(tmp_path / "missing"))
  model = fszjax.load(workdir[0])
  with pytest.raises(ValueError, match=r"images must be \(B, 16, 16, 1\) NHWC"):
    model.encode_image(np.zeros((2, 8, 8, 1), np.float32))
