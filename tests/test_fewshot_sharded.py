"""The meta-batch sharded over 8 simulated devices equals a Python loop over its tasks."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from fszjax import sharding as shd
from fszjax.fewshot import meta
from tests.test_fewshot_meta import CFG, features_fn, flat, init_params, make_tasks, one


@pytest.mark.parametrize("mesh_shape,t,chunk", [((8, 1, 1), 8, 0), ((4, 2, 1), 16, 1)])
def test_sharded_meta_step_equals_python_loop(mesh_shape, t, chunk):
  assert jax.device_count() == 8
  mesh = shd.make_mesh(*mesh_shape)
  params, tasks = init_params(jax.random.key(0)), make_tasks(jax.random.key(1), t=t)
  cfg = dataclasses.replace(CFG, task_chunk=chunk)
  opt = optax.sgd(1.0)
  step = meta.make_meta_step(features_fn, cfg, opt, mesh=mesh, donate=False)
  placed = jax.device_put(tasks, meta.task_shardings(mesh, tasks))
  assert placed["support_x"].sharding.spec[0] == shd.BATCH_AXES
  new, _, metrics = step(params, opt.init(params), placed)
  per_task = jax.jit(lambda p, task: meta.task_grad(p, task, features_fn=features_fn, cfg=CFG))
  grads = [per_task(params, one(tasks, i)) for i in range(t)]
  mean_g = np.mean([flat(g) for g, _ in grads], 0)
  np.testing.assert_allclose(flat(new), flat(params) - mean_g, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], np.mean([m["loss"] for _, m in grads]), rtol=1e-5)


def test_meta_batch_must_divide_devices():
  mesh = shd.make_mesh(8, 1, 1)
  params, tasks = init_params(jax.random.key(0)), make_tasks(jax.random.key(1), t=4)
  step = meta.make_meta_step(features_fn, CFG, optax.sgd(1.0), mesh=mesh, donate=False)
  with pytest.raises(ValueError, match="multiple of 8"):
    step(params, optax.sgd(1.0).init(params), tasks)
