"""Accelerator numerics on the CPU: a bf16 train step (bf16 compute, fp32 parameters) agrees
with fp32 within a stated tolerance, and every remat policy gives the gradients of
``remat="none"``.

Tolerances (also in BUILD_NOTES.md, "Sharded optimizer state (issue 12)"):
  bf16 vs fp32: loss within 1% (relative); every gradient entry within 5% of the largest
    gradient entry of the fp32 step (|g_bf16 - g_fp32| <= 0.05 * max|g_fp32|), and the
    whole gradient within 5% in L2 norm (||g_bf16 - g_fp32|| <= 0.05 ||g_fp32||).
    Measured on this tiny model (clip / siglip): loss 0.24% / 0.08%, largest entry error
    2.2% / 0.7% of max|g|, L2 2.3% / 1.2% (bf16 keeps 8 bits of mantissa: 0.4% per
    rounding, and the errors of a few dozen sums add up).
    Elementwise relative error is no criterion: some gradients are exactly zero in exact
    arithmetic (attention key biases: softmax ignores a constant shift) and are rounding
    noise in both precisions.
  remat policy vs none (fp32): |g_policy - g_none| <= 1e-6 + 1e-4 |g_none|, loss equal to
    1e-6: the same math, only the order of a few floating-point sums differs.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fszjax import pretrain, sharding
from fszjax.models.common import REMAT_POLICIES
from fszjax.models.two_tower import build_model
from helpers import mesh_of, random_batch, tiny_config

DEPTH2 = ["--config.mesh.data=1", "--config.model.image.depth=2", "--config.model.text.depth=2"]
_CACHE: dict = {}
_PARAMS: dict = {}


def _params(scan: bool):
  """Initial parameters (fp32): the same for every remat policy and compute dtype."""
  if scan not in _PARAMS:
    cfg = tiny_config(*DEPTH2, f"--config.model.scan_layers={scan}")
    state, *_ = pretrain.create_train_state(cfg, mesh_of((1, 1, 1)), sharding.DEFAULT_RULES)
    _PARAMS[scan] = state.params
  return _PARAMS[scan]


def loss_and_grads(*extra):
  """Loss and parameter gradients of the train step (one device, fixed init and batch)."""
  if extra in _CACHE:
    return _CACHE[extra]
  cfg = tiny_config(*DEPTH2, *extra)
  model = build_model(cfg.model)
  fn = pretrain.make_loss_and_grads(model, cfg, mesh=None)

  def run(params, batch):
    with nn.logical_axis_rules(sharding.DEFAULT_RULES):
      loss, grads, _, _ = fn(params, batch)
    return loss, grads

  loss, grads = jax.jit(run)(_params(bool(cfg.model.scan_layers)), random_batch(cfg))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(grads))  # fp32 params
  _CACHE[extra] = (float(loss), jax.tree.map(np.asarray, grads))
  return _CACHE[extra]


def _global_norm(tree):
  return float(np.sqrt(sum(np.sum(np.square(x.astype(np.float64))) for x in jax.tree.leaves(tree))))


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_bf16_step_matches_fp32(loss):
  l32, g32 = loss_and_grads(f"--config.loss={loss}")
  lbf, gbf = loss_and_grads(f"--config.loss={loss}", "--config.model.dtype=bfloat16",
                            "--config.model.param_dtype=float32")
  assert abs(lbf - l32) <= 0.01 * abs(l32), (lbf, l32)
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(g32))
  chex.assert_trees_all_close(jax.tree.map(lambda x: x / scale, gbf),
                              jax.tree.map(lambda x: x / scale, g32), atol=0.05, rtol=0.0)
  diff = jax.tree.map(lambda a, b: a - b, gbf, g32)
  assert _global_norm(diff) <= 0.05 * _global_norm(g32)
  # bf16 really computed in bf16: the gradients differ from fp32 beyond fp32 rounding.
  assert _global_norm(diff) > 1e-4 * _global_norm(g32)


POLICIES = sorted(set(REMAT_POLICIES) - {"none"})


# Every policy on the scanned layout (the B/16 configs' one); the per-block layout wraps
# each block in the same `nn.remat` with the policy as a parameter, checked with "full".
@pytest.mark.parametrize("policy,scan", [(p, True) for p in POLICIES] + [("full", False)])
def test_remat_policy_gives_the_gradients_of_none(policy, scan):
  ln, gn = loss_and_grads(f"--config.model.scan_layers={scan}")
  lp, gp = loss_and_grads(f"--config.model.scan_layers={scan}", f"--config.model.remat={policy}")
  assert abs(lp - ln) <= 1e-6 * abs(ln)
  chex.assert_trees_all_close(gp, gn, atol=1e-6, rtol=1e-4)
