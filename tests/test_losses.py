"""Chunked (sharded) contrastive losses against their dense references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fszjax import losses, sharding
from helpers import mesh_of

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]


def _emb(b=32, d=8, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  zi = jax.random.normal(k1, (b, d))
  zt = zi + 0.8 * jax.random.normal(k2, (b, d))  # correlated: positives score higher
  n = lambda z: z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  return n(zi), n(zt)


def test_dense_siglip_matches_formula():
  zi, zt = _emb(6, 4)
  t, b = jnp.log(7.0), -2.0
  logits = np.asarray(zi) @ np.asarray(zt).T * 7.0 - 2.0
  y = 2 * np.eye(6) - 1
  ref = np.sum(np.log1p(np.exp(-y * logits))) / 6
  np.testing.assert_allclose(float(losses.siglip_loss_dense(zi, zt, t, b)), ref, rtol=1e-5)


def test_dense_clip_matches_formula():
  zi, zt = _emb(6, 4)
  logits = np.asarray(zi) @ np.asarray(zt).T * 5.0
  lse_r = np.log(np.exp(logits).sum(1))
  lse_c = np.log(np.exp(logits).sum(0))
  ref = 0.5 * (np.mean(lse_r - np.diag(logits)) + np.mean(lse_c - np.diag(logits)))
  np.testing.assert_allclose(float(losses.clip_loss_dense(zi, zt, jnp.log(5.0))), ref, rtol=1e-5)


@pytest.mark.parametrize("shape", MESHES)
def test_chunked_siglip_equals_dense(shape):
  mesh = mesh_of(shape)
  zi, zt = _emb()
  t, b = jnp.log(10.0), jnp.asarray(-5.0)
  v1, g1 = jax.value_and_grad(losses.siglip_loss_dense, argnums=(0, 1, 2, 3))(zi, zt, t, b)
  f = lambda a, c, s, bb: losses.siglip_loss_chunked(a, c, s, bb, mesh)
  v2, g2 = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(zi, zt, t, b)
  np.testing.assert_allclose(float(v2), float(v1), rtol=1e-5)
  chex.assert_trees_all_close(g2, g1, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", MESHES)
def test_chunked_clip_equals_dense(shape):
  mesh = mesh_of(shape)
  zi, zt = _emb()
  t = jnp.log(10.0)
  v1, g1 = jax.value_and_grad(losses.clip_loss_dense, argnums=(0, 1, 2))(zi, zt, t)
  f = lambda a, c, s: losses.clip_loss_chunked(a, c, s, mesh)
  v2, g2 = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(zi, zt, t)
  np.testing.assert_allclose(float(v2), float(v1), rtol=1e-5)
  chex.assert_trees_all_close(g2, g1, rtol=1e-4, atol=1e-6)


def _temp_bytes(fn, n, b=64, d=32):
  mesh = mesh_of((n, 1, 1))
  z = jax.ShapeDtypeStruct((b * n, d), jnp.float32, sharding=sharding.batch_sharding(mesh, 2))
  s = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
  g = jax.jit(jax.value_and_grad(lambda a, c, t, bb: fn(a, c, t, bb, mesh), argnums=(0, 1, 2, 3)))
  with jax.set_mesh(mesh):
    return g.lower(z, z, s, s).compile().memory_analysis().temp_size_in_bytes


def test_chunked_siglip_memory_does_not_grow_with_data_parallelism():
  chunked = {n: _temp_bytes(losses.siglip_loss_chunked, n) for n in (2, 4, 8)}
  dense = {n: _temp_bytes(lambda a, c, t, bb, m: losses.siglip_loss_dense(a, c, t, bb), n)
           for n in (2, 4, 8)}
  # Fixed per-device batch: the ring's footprint is flat, the dense one grows ~ n.
  assert chunked[8] <= chunked[2] * 1.05, chunked
  assert dense[8] >= 3 * dense[2], dense
  assert chunked[8] < dense[8] / 2, (chunked, dense)


def _clip_temp_bytes(fn, n, b=512, d=256):
  mesh = mesh_of((n, 1, 1))
  z = jax.ShapeDtypeStruct((b * n, d), jnp.float32, sharding=sharding.batch_sharding(mesh, 2))
  s = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
  g = jax.jit(jax.value_and_grad(lambda a, c, t: fn(a, c, t, mesh), argnums=(0, 1, 2)))
  with jax.set_mesh(mesh):
    return g.lower(z, z, s).compile().memory_analysis().temp_size_in_bytes


def test_chunked_clip_memory_not_above_dense():
  # 512 rows per device, E=256 (issue 17): loss + gradient temporaries per device.
  chunked = {n: _clip_temp_bytes(losses.clip_loss_chunked, n) for n in (2, 4, 8)}
  dense = {n: _clip_temp_bytes(lambda a, c, t, m: losses.clip_loss_dense(a, c, t), n)
           for n in (2, 4, 8)}
  for n in (2, 4, 8):
    assert chunked[n] <= dense[n], (n, chunked, dense)
  # The ring holds (b, b) blocks only: flat in the device count, unlike dense.
  assert chunked[8] <= chunked[2] * 1.05, chunked
  assert chunked[8] < dense[8] / 4, (chunked, dense)


def test_contrastive_loss_rejects_unknown_kind():
  zi, zt = _emb(4, 4)
  with pytest.raises(ValueError, match="unknown loss"):
    losses.contrastive_loss("triplet", zi, zt, 0.0)
