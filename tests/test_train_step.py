"""The sharded train step: same loss and params on every mesh; exact gradient accumulation."""

import chex
import jax
import numpy as np
import pytest

from fszjax import bench, pretrain, sharding
from helpers import max_abs_diff, mesh_of, random_batch, tiny_config


def _one_step(cfg, shape, batch, steps=1, jit=True):
  mesh = mesh_of(shape)
  rules = sharding.rules_from_config(cfg)
  state, model, tx, sched = pretrain.create_train_state(cfg, mesh, rules)
  step = pretrain.make_train_step(model, tx, sched, cfg, mesh, rules,
                                  state_shardings=sharding.shardings_of(state))
  gb = sharding.host_to_global(batch, mesh)
  for _ in range(steps):
    state, metrics = step(state, gb)
  return jax.tree.map(np.asarray, state.params), {k: float(v) for k, v in metrics.items()}


_REF = {}


def _reference(loss):
  if loss not in _REF:
    cfg = tiny_config(f"--config.loss={loss}")
    _REF[loss] = _one_step(cfg, (1, 1, 1), random_batch(cfg))
  return _REF[loss]


@pytest.mark.parametrize("loss", ["siglip", "clip"])
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_step_same_on_every_mesh(loss, shape):
  cfg = tiny_config(f"--config.loss={loss}")
  p1, m1 = _reference(loss)
  p2, m2 = _one_step(cfg, shape, random_batch(cfg))
  assert abs(m1["loss"] - m2["loss"]) < 1e-5 * max(1.0, abs(m1["loss"]))
  assert abs(m1["grad_norm"] - m2["grad_norm"]) < 1e-4 * m1["grad_norm"]
  chex.assert_trees_all_close(p1, p2, atol=2e-5, rtol=0.0)
  # The update really moved the parameters (lr 0.01, no warmup).
  p0 = jax.tree.map(np.asarray, pretrain.create_train_state(cfg, mesh_of((1, 1, 1)),
                                                            sharding.rules_from_config(cfg))[0].params)
  assert max_abs_diff(p0, p1) > 1e-3


@pytest.mark.parametrize("loss", ["siglip", "clip"])
def test_grad_accumulation_equals_one_big_batch(loss):
  cfg1 = tiny_config(f"--config.loss={loss}")
  cfg4 = tiny_config(f"--config.loss={loss}", "--config.grad_accum=4")
  batch = random_batch(cfg1)
  p1, m1 = _one_step(cfg1, (2, 1, 1), batch, steps=2)
  p4, m4 = _one_step(cfg4, (2, 1, 1), batch, steps=2)
  assert abs(m1["loss"] - m4["loss"]) < 1e-5 * abs(m1["loss"])
  assert abs(m1["grad_norm"] - m4["grad_norm"]) < 1e-4 * m1["grad_norm"]
  chex.assert_trees_all_close(p1, p4, atol=2e-5, rtol=0.0)


def test_loss_decreases_and_metrics_present():
  cfg = tiny_config()
  _, m = _one_step(cfg, (1, 1, 1), random_batch(cfg), steps=8)
  _, m0 = _reference("siglip")
  assert m["loss"] < m0["loss"]
  for k in ("loss", "lr", "grad_norm", "logit_scale", "logit_bias", "i2t_acc"):
    assert k in m and np.isfinite(m[k])


def test_weight_decay_mask_and_freeze():
  cfg = tiny_config()
  state, *_ = pretrain.create_train_state(cfg, mesh_of((1, 1, 1)), sharding.DEFAULT_RULES)
  mask = pretrain.decay_mask(state.params)
  assert mask["img"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"] is True
  assert mask["img"]["encoder"]["block_0"]["mlp"]["fc1"]["bias"] is False
  assert mask["img"]["encoder"]["block_0"]["ln_1"]["scale"] is False
  assert mask["logit_scale"] is False

  frozen = tiny_config("--config.optim.freeze=['^img/']")
  mesh = mesh_of((1, 1, 1))
  state, model, tx, sched = pretrain.create_train_state(frozen, mesh, sharding.DEFAULT_RULES)
  before = jax.tree.map(np.asarray, state.params)
  step = pretrain.make_train_step(model, tx, sched, frozen, mesh, sharding.DEFAULT_RULES,
                                  state_shardings=sharding.shardings_of(state))
  state, _ = step(state, sharding.host_to_global(random_batch(frozen), mesh))
  after = jax.tree.map(np.asarray, state.params)
  chex.assert_trees_all_equal(before["img"], after["img"])
  assert max_abs_diff(before["txt"], after["txt"]) > 0.0


def test_bench_same_loss_on_one_and_eight_devices():
  cfg = tiny_config("--config.mesh.data=1")
  r1 = bench.bench_pretrain(cfg, steps=3, devices=jax.devices()[:1])
  cfg8 = tiny_config("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
  r8 = bench.bench_pretrain(cfg8, steps=3)
  assert r8["devices"] == 8 and r1["devices"] == 1
  assert abs(r1["loss_first"] - r8["loss_first"]) < 1e-5 * abs(r1["loss_first"])
  assert abs(r1["loss_last"] - r8["loss_last"]) < 1e-4 * abs(r1["loss_last"])
  assert r1["loss_last"] < r1["loss_first"]
  assert r1["mfu"] is None and r1["model_tflops_per_step"] > 0
  assert bench.bench_pretrain(cfg, steps=2, peak_tflops=1.0,
                              devices=jax.devices()[:1])["mfu"] > 0


def test_throughput_fields_model_tflops_and_mfu():
  from fszjax import flops

  cfg = tiny_config()
  mesh = mesh_of((2, 2, 2))
  per_step = flops.train_flops_per_step(cfg.model, cfg.batch_size) / 1e12
  out = pretrain.throughput_fields(cfg, mesh, steps=4, seconds=2.0)
  assert out == {"model_tflops_per_device": pytest.approx(per_step * 2 / 8)}  # CPU: no peak
  out = pretrain.throughput_fields(cfg, mesh, steps=4, seconds=2.0, peak_tflops=1e-6)
  assert out["mfu"] == pytest.approx(out["model_tflops_per_device"] / 1e-6)
