"""Conv-4: every convolution formulation equals lax.conv_general_dilated (values, grads, HVPs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fszjax.fewshot import conv4


def ref_conv(x, w):
  return jax.lax.conv_general_dilated(
      x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)


def _all_orders(conv, x, w, g, v):
  """(y, dL/dx, dL/dw, Hessian-vector product in w) of L = sum(sin(conv(x, w)) * g), jitted."""

  def f(x, w):
    return jnp.sum(jnp.sin(conv(x, w)) * g)

  def run(x, w):
    gx, gw = jax.grad(f, (0, 1))(x, w)
    hv = jax.jvp(lambda w: jax.grad(f, 1)(x, w), (w,), (v,))[1]
    return conv(x, w), gx, gw, hv

  return jax.jit(run)(x, w)


_REF = {}


@pytest.mark.parametrize("formulation", [f for f in conv4.FORMULATIONS if f != "conv"])
@pytest.mark.parametrize("hw,cin", [((9, 8), 2)])  # odd and even sides
def test_conv_formulations_match_reference(formulation, hw, cin):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2,) + hw + (cin,))
  w = jax.random.normal(kw, (3, 3, cin, 4))
  out_shape = (2, (hw[0] - 1) // 2 + 1, (hw[1] - 1) // 2 + 1, 4)
  g = jax.random.normal(kg, out_shape)
  v = jax.random.normal(kg, w.shape)
  if (hw, cin) not in _REF:
    _REF[(hw, cin)] = _all_orders(ref_conv, x, w, g, v)
  got = _all_orders(lambda x, w: conv4.conv3x3s2(x, w, formulation), x, w, g, v)
  assert got[0].shape == out_shape
  for a, b in zip(got, _REF[(hw, cin)]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # The 'conv' formulation is the reference itself.
  np.testing.assert_allclose(conv4.conv3x3s2(x, w, "conv"), _REF[(hw, cin)][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_conv4_features_formulations_agree_under_vmap(norm):
  params = conv4.init_conv4(jax.random.key(1), 5, hidden=4, layers=2, norm=norm, image_size=16)
  # Per-task weights, as in an inner loop: vmap over tasks of (weights, images).
  bb = jax.tree.map(lambda p: jnp.stack([p, 1.1 * p]), params["backbone"])
  x = jax.random.normal(jax.random.key(2), (2, 3, 9, 9, 1))
  forms = ("im2col", "conv") if norm == "batch" else ("patches", "s2d", "conv")
  outs = {f: jax.jit(jax.vmap(conv4.make_conv4_features_fn(f)))(bb, x) for f in forms}
  assert outs["conv"].shape == (2, 3, 4)
  for f in forms:
    np.testing.assert_allclose(outs[f], outs["conv"], rtol=1e-4, atol=1e-4)
  if norm == "batch":  # bfloat16 matmul operands stay close to float32
    bf = jax.jit(jax.vmap(conv4.make_conv4_features_fn("im2col", compute_dtype="bfloat16")))(bb, x)
    np.testing.assert_allclose(bf, outs["conv"], rtol=0.05, atol=0.05)
  flat = conv4.conv4_features(params["backbone"], x[0, :, :, :, 0], pool="flatten")
  assert flat.shape == (3, conv4.conv4_feature_dim(4, 9, layers=2, pool="flatten")) == (3, 36)


def test_conv4_errors():
  params = conv4.init_conv4(jax.random.key(0), 5, hidden=4)
  with pytest.raises(ValueError, match="formulation"):
    conv4.make_conv4_features_fn("winograd")
  with pytest.raises(ValueError, match="expects images"):
    conv4.conv4_features(params["backbone"], jnp.zeros((2, 28)))
