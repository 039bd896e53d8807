"""Model behaviour: causal mask, pooling modes, variants, logical axis names, options."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fszjax.models import common, text, two_tower, vit
from helpers import tiny_config


def _text_tower(**kw):
  args = dict(vocab_size=50, width=32, depth=2, mlp_dim=64, num_heads=2, max_len=8, embed_dim=16)
  args.update(kw)
  return text.TextTower(**args)


def test_causal_mask_future_token_does_not_change_past():
  m = _text_tower(causal=True)
  toks = jnp.asarray([[5, 6, 7, 8, 9, 10, 11, 49]], jnp.int32)
  params = m.init(jax.random.key(0), toks)
  h1 = m.apply(params, toks, return_hidden=True)[1]["tokens"]
  t = 3
  toks2 = toks.at[0, t + 1].set(33)
  h2 = m.apply(params, toks2, return_hidden=True)[1]["tokens"]
  np.testing.assert_allclose(h1[0, : t + 1], h2[0, : t + 1], atol=1e-6)
  assert float(jnp.abs(h1[0, t + 1] - h2[0, t + 1]).max()) > 1e-3


def test_bidirectional_future_token_changes_past():
  m = _text_tower(causal=False)
  toks = jnp.asarray([[5, 6, 7, 8, 9, 10, 11, 49]], jnp.int32)
  params = m.init(jax.random.key(0), toks)
  h1 = m.apply(params, toks, return_hidden=True)[1]["tokens"]
  h2 = m.apply(params, toks.at[0, 4].set(33), return_hidden=True)[1]["tokens"]
  assert float(jnp.abs(h1[0, 0] - h2[0, 0]).max()) > 1e-4


def test_pooling_modes_pick_what_they_say():
  x = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
  toks = jnp.asarray([[3, 9, 2, 0, 0], [4, 4, 7, 1, 0]], jnp.int32)  # highest id: pos 1, pos 2
  np.testing.assert_array_equal(text.pool_tokens(x, toks, "eot"), x[jnp.arange(2), jnp.asarray([1, 2])])
  np.testing.assert_array_equal(text.pool_tokens(x, toks, "last"), x[:, -1])
  np.testing.assert_array_equal(text.pool_tokens(x, toks, "first"), x[:, 0])
  np.testing.assert_allclose(text.pool_tokens(x, toks, "mean"),
                             jnp.stack([x[0, :3].mean(0), x[1, :4].mean(0)]))
  with pytest.raises(ValueError, match="unknown text pool"):
    text.pool_tokens(x, toks, "max")


def test_eot_pooling_ignores_tokens_after_eot_when_causal():
  m = _text_tower(causal=True, pool="eot")
  toks = jnp.asarray([[5, 6, 49, 0, 0, 0, 0, 0]], jnp.int32)
  params = m.init(jax.random.key(0), toks)
  z1 = m.apply(params, toks)[0]
  z2 = m.apply(params, toks.at[0, 4].set(7))[0]
  np.testing.assert_allclose(z1, z2, atol=1e-6)


@pytest.mark.parametrize("pool", ["tok", "gap", "map", "none"])
def test_vit_pooling_shapes_and_semantics(pool):
  m = vit.ViT(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=4, embed_dim=None, pool=pool)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  params = m.init(jax.random.key(0), x)
  out, extras = m.apply(params, x)
  toks = extras["tokens"]
  if pool == "tok":
    assert toks.shape == (2, 17, 32)
    np.testing.assert_allclose(out, toks[:, 0], atol=1e-6)
  elif pool == "gap":
    np.testing.assert_allclose(out, toks.mean(1), atol=1e-6)
  elif pool == "map":
    assert out.shape == (2, 32) and "map_head" in params["params"]
  else:
    assert out.shape == (2, 16, 32)


def test_tower_input_checks_at_trace_time():
  """Misused inputs fail at the tower boundary, under jit too: a 3-D image batch, raw uint8
  pixels, (L,) or float tokens."""
  m = vit.ViT(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, embed_dim=16)
  x = jnp.zeros((2, 16, 16, 1))
  params = m.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"images must be \(B, H, W, C\)"):
    m.apply(params, x[0])
  with pytest.raises(AssertionError, match="assert_type"):
    jax.jit(m.apply)(params, x.astype(jnp.uint8))
  t = _text_tower()
  toks = jnp.ones((2, 8), jnp.int32)
  tparams = t.init(jax.random.key(0), toks)
  with pytest.raises(ValueError, match=r"tokens must be \(B, L\)"):
    t.apply(tparams, toks[0])
  with pytest.raises(AssertionError, match="assert_type"):
    jax.jit(t.apply)(tparams, toks.astype(jnp.float32))
  assert jax.jit(t.apply)(tparams, toks)[0].shape == (2, 16)


def test_variants_parse():
  assert vit.parse_variant("B/16") == ((768, 12, 3072, 12), 16)
  assert vit.parse_variant("So400m/14")[0][0] == 1152
  with pytest.raises(ValueError, match="unknown model variant"):
    vit.parse_variant("Q/16")


def test_sincos_posemb_and_ln_pre():
  m = vit.ViT(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=4, posemb="sincos2d",
              ln_pre=True, pool="gap")
  x = jnp.ones((1, 8, 8, 1))
  params = m.init(jax.random.key(0), x)["params"]
  assert "pos_embedding" not in params and "ln_pre" in params
  pe = vit.sincos_2d(2, 2, 32)
  assert pe.shape == (1, 4, 32) and np.abs(pe).max() <= 1.0


def test_activations():
  x = jnp.linspace(-3, 3, 7)
  np.testing.assert_allclose(common.activation("quick_gelu")(x), x * jax.nn.sigmoid(1.702 * x))
  assert float(jnp.abs(common.activation("gelu")(x) - common.activation("gelu_tanh")(x)).max()) > 0
  with pytest.raises(ValueError):
    common.activation("swishy")


def test_every_param_has_logical_axes_and_scan_matches_loop():
  cfg = tiny_config("--config.model.image.depth=2", "--config.model.text.depth=2")
  model = two_tower.build_model(cfg.model)
  img = jnp.zeros((2, 16, 16, 1))
  tok = jnp.ones((2, 8), jnp.int32)
  boxed = model.init(jax.random.key(0), img, tok)["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(l, nn.Partitioned) for l in leaves)
  for l in leaves:
    assert len(l.names) == l.value.ndim

  cfg_s = tiny_config("--config.model.image.depth=2", "--config.model.text.depth=2",
                      "--config.model.scan_layers=True", "--config.model.remat=full")
  model_s = two_tower.build_model(cfg_s.model)
  p = nn.unbox(boxed)
  ps = nn.unbox(model_s.init(jax.random.key(0), img, tok)["params"])
  # Stack the unscanned blocks into the scanned layout and compare outputs.
  for tower in ("img", "txt"):
    enc = p[tower]["encoder"]
    ps[tower]["encoder"]["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), enc["block_0"], enc["block_1"])
    for k in p[tower]:
      if k != "encoder":
        ps[tower][k] = p[tower][k]
  ps["logit_scale"], ps["logit_bias"] = p["logit_scale"], p["logit_bias"]
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 1))
  out = model.apply({"params": p}, x, tok)
  out_s = model_s.apply({"params": ps}, x, tok)
  chex.assert_trees_all_close(out[:2], out_s[:2], atol=1e-5, rtol=1e-7)  # numpy's default rtol


def test_bf16_compute_keeps_fp32_params():
  cfg = tiny_config("--config.model.dtype=bfloat16")
  model = two_tower.build_model(cfg.model)
  x = jnp.zeros((2, 16, 16, 1))
  tok = jnp.ones((2, 8), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), x, tok)["params"])
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(params))
  _, _, out = model.apply({"params": params}, x, tok)
  assert out["img"]["features"].dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- fast CPU blocks (issue 17)


def test_gelu_erf_equals_jax_exact_gelu():
  x = jnp.linspace(-8.0, 8.0, 4001)
  ref = functools.partial(jax.nn.gelu, approximate=False)
  np.testing.assert_allclose(common.gelu_erf(x), ref(x), atol=2e-6)
  g = jax.vmap(jax.grad(common.gelu_erf))(x)
  np.testing.assert_allclose(g, jax.vmap(jax.grad(ref))(x), atol=2e-6)


def test_layer_norm_equals_flax_layer_norm_with_gradients():
  x = 3.0 * jax.random.normal(jax.random.key(0), (4, 5, 16)) + 1.0
  ours = common.LayerNorm(epsilon=1e-5)
  theirs = nn.LayerNorm(epsilon=1e-5)
  p = theirs.init(jax.random.key(1), x)
  p = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(2), a.shape), p)
  assert jax.tree.structure(nn.unbox(ours.init(jax.random.key(1), x))) == jax.tree.structure(p)
  ct = jax.random.normal(jax.random.key(3), x.shape)
  f = lambda m: lambda p, x: jnp.sum(m.apply(p, x) * ct)
  np.testing.assert_allclose(ours.apply(p, x), theirs.apply(p, x), atol=2e-6)
  chex.assert_trees_all_close(jax.grad(f(ours), argnums=(0, 1))(p, x),
                              jax.grad(f(theirs), argnums=(0, 1))(p, x), atol=5e-5, rtol=1e-7)


@pytest.mark.parametrize("causal", [False, True])
def test_fused_attention_equals_separate_projections(causal):
  x = jax.random.normal(jax.random.key(0), (2, 7, 32))
  attn = common.Attention(num_heads=4)
  p = nn.unbox(attn.init(jax.random.key(1), x))
  pa = p["params"]

  def proj(n, x):
    return jnp.einsum("btd,dhk->bthk", x, pa[n]["kernel"]) + pa[n]["bias"]

  y = jax.nn.dot_product_attention(proj("query", x), proj("key", x), proj("value", x),
                                   is_causal=causal)
  ref = jnp.einsum("bthk,hkd->btd", y, pa["out"]["kernel"]) + pa["out"]["bias"]
  np.testing.assert_allclose(attn.apply(p, x, causal=causal), ref, atol=2e-5)
  # Cross-attention (the MAP head's path): query from one input, key/value from another.
  probe = jax.random.normal(jax.random.key(2), (2, 1, 32))
  y = jax.nn.dot_product_attention(proj("query", probe), proj("key", x), proj("value", x))
  ref = jnp.einsum("bthk,hkd->btd", y, pa["out"]["kernel"]) + pa["out"]["bias"]
  np.testing.assert_allclose(attn.apply(p, probe, x), ref, atol=2e-5)
