"""The optimizer state is sharded like the parameters (FSDP saves memory on the largest part
of the state), the train step keeps it so, and checkpoints written with the older
replicated optimizer-state layout restore onto the new one."""

import os
import re

import chex
import jax
import numpy as np

from fszjax import checkpoint, pretrain, sharding
from helpers import mesh_of, random_batch, tiny_config

# A glyphs config with a wider model: several leaves (MLP kernels, token embedding and
# their Adam moments) are larger than 1 MB.
WIDE = ["--config.model.image.width=384", "--config.model.image.mlp_dim=1536",
        "--config.model.image.num_heads=6", "--config.model.image.depth=2",
        "--config.model.text.width=384", "--config.model.text.mlp_dim=1536",
        "--config.model.text.num_heads=6", "--config.model.text.depth=2",
        "--config.model.text.vocab_size=1024", "--config.model.embed_dim=128",
        # A 2-layer stem. The stem's 3x3 kernels stay replicated: with the Glyphs 4-layer
        # stem 1.34 of this state's 92.6 MB are replicated (0.45 MB with this one), over
        # the 5 % slack on each device's 1/8 share below; (32, 64, 64, 64) in front of a
        # B/16 would be ~0.2 % of its image tower's parameters.
        "--config.model.image.stem=(32, 64)"]
MB = 1 << 20


def _nbytes(shape, dtype):
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _param_spec_by_path(params):
  """{key path: spec} of the parameters (for the leaf-by-leaf comparison below)."""
  return {tuple(p): x.sharding.spec for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _mirrored_param(path, by_path):
  """The parameter key path that an optimizer-state leaf path ends with (longest), or None.

  Independent of the implementation (which uses optax.tree_map_params): Adam's mu/nu are
  copies of the parameter dict nested inside the optax state, so their key paths end with
  a parameter's full key path.
  """
  path = tuple(path)
  for i in range(len(path)):
    if path[i:] in by_path:
      return path[i:]
  return None


def _check_opt_specs_equal_param_specs(state):
  by_path = _param_spec_by_path(state.params)
  mirrored = 0
  for path, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
    hit = _mirrored_param(path, by_path)
    if hit is None:  # counters and other bookkeeping: replicated scalars
      assert x.ndim == 0 and x.sharding.is_fully_replicated, jax.tree_util.keystr(path)
    else:
      assert x.sharding.spec == by_path[hit], jax.tree_util.keystr(path)
      mirrored += 1
  return mirrored


def test_fsdp8_state_split_eight_ways_and_opt_specs_equal_param_specs():
  cfg = tiny_config("--config.mesh.data=1", "--config.mesh.fsdp=8", *WIDE)
  mesh = mesh_of((1, 8, 1))
  state, *_ = pretrain.create_train_state(cfg, mesh, sharding.rules_from_config(cfg))
  dev0 = jax.devices()[0]
  total = per_device = 0
  big = 0
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    size = _nbytes(x.shape, x.dtype)
    shard = [s for s in x.addressable_shards if s.device == dev0][0]
    shard_bytes = _nbytes(shard.data.shape, shard.data.dtype)
    total += size
    per_device += shard_bytes
    if size > MB:
      big += 1
      assert shard_bytes * 8 == size, (jax.tree_util.keystr(path), x.shape, x.sharding.spec)
  assert big >= 9  # 3 big params (2 MLP kernels... and the token table), each with mu and nu
  assert per_device <= total / 8 * 1.05, (per_device, total)
  # Adam's mu and nu: one copy each of every parameter, with the parameter's spec.
  assert _check_opt_specs_equal_param_specs(state) == 2 * len(jax.tree.leaves(state.params))


def test_masked_decay_and_frozen_multi_transform_states_follow_params():
  """multi_transform (LiT-style frozen image tower) + clip + masked weight decay: the
  trained params' moments are sharded like them; the frozen ones have none."""
  cfg = tiny_config("--config.mesh.data=2", "--config.mesh.fsdp=4",
                    "--config.optim.freeze=['^img/']", "--config.optim.clip_norm=1.0")
  mesh = mesh_of((2, 4, 1))
  abstract = pretrain.abstract_train_state(cfg, mesh, sharding.rules_from_config(cfg))
  n_txt = sum(1 for p, _ in jax.tree_util.tree_flatten_with_path(abstract.params)[0]
              if not re.match("img", jax.tree_util.keystr(p)[2:]))
  assert _check_opt_specs_equal_param_specs(abstract) == 2 * n_txt
  assert any(x.sharding.spec != jax.sharding.PartitionSpec()
             for x in jax.tree.leaves(abstract.opt_state))


def _count(hlo, op):
  return len(re.findall(rf"\s{op}(?:-start)?\(", hlo))


def _fsdp8_state_and_step():
  """The tiny config on a fsdp=8 mesh: (config, mesh, sharded initial state, jitted step)."""
  # MAP pooling (as B/16): its head is a large sharded leaf. With the Glyphs default's mean
  # pooling and 4-layer stem the tiny model is mostly small replicated leaves (norms, the
  # stem's 3x3 kernels), so this uses MAP and a 2-layer stem.
  cfg = tiny_config("--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.model.image.pool=map",
                    "--config.model.image.stem=(32, 64)")
  mesh = mesh_of((1, 8, 1))
  rules = sharding.rules_from_config(cfg)
  state, model, tx, sched = pretrain.create_train_state(cfg, mesh, rules)
  step = pretrain.make_train_step(model, tx, sched, cfg, mesh, rules,
                                  state_shardings=sharding.shardings_of(state))
  return cfg, mesh, state, step


def test_train_step_keeps_state_sharded_under_fsdp8():
  """The compiled step takes and returns the sharded state (no replicated Adam moments);
  its argument bytes per device are about 1/8 of the state plus the batch."""
  cfg, mesh, state, step = _fsdp8_state_and_step()
  batch = sharding.host_to_global(random_batch(cfg), mesh)
  with jax.set_mesh(mesh):
    compiled = step.jitted.lower(state, batch).compile()
  out_state = compiled.output_shardings[0]
  for want, got in zip(jax.tree.leaves(sharding.shardings_of(state)), jax.tree.leaves(out_state)):
    assert want.spec == got.spec
  # Per-device bytes of the state as sharded (tiny leaves such as the conv stem's 3x3
  # kernels and the norms stay replicated) plus the batch's shard: the compiled step takes
  # exactly these arguments, and far less than the whole state.
  def shard_bytes(x):
    return _nbytes(x.sharding.shard_shape(x.shape), x.dtype)
  state_bytes = sum(_nbytes(x.shape, x.dtype) for x in jax.tree.leaves(state))
  state_shard_bytes = sum(shard_bytes(x) for x in jax.tree.leaves(state))
  batch_bytes = sum(_nbytes(x.shape, x.dtype) for x in jax.tree.leaves(batch))
  args = compiled.memory_analysis().argument_size_in_bytes
  assert args <= (state_shard_bytes + batch_bytes / 8) * 1.05, (args, state_shard_bytes)
  assert args <= state_bytes / 2, (args, state_bytes)
  # XLA's CPU backend writes the FSDP gradient reduction as all-reduce + dynamic-slice
  # (it has no pass fusing the two into a reduce-scatter; see BUILD_NOTES.md).
  hlo = compiled.as_text()
  assert _count(hlo, "all-reduce") > 0
  # And the step runs: the updated state keeps its sharding.
  with jax.set_mesh(mesh):
    new_state, metrics = compiled(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  _check_opt_specs_equal_param_specs(new_state)


def test_checkpoint_with_replicated_opt_state_restores_onto_sharded_layout(tmp_path):
  """Checkpoints written before the optimizer state was sharded (every mu/nu leaf P())
  restore onto the new abstract target with equal values and the new shardings."""
  cfg, mesh, state, step = _fsdp8_state_and_step()
  state, _ = step(state, sharding.host_to_global(random_batch(cfg), mesh))  # non-zero moments
  rep = sharding.replicated(mesh)
  old = state.replace(opt_state=jax.tree.map(lambda x: jax.device_put(x, rep), state.opt_state))
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(old.opt_state))
  expected = jax.tree.map(np.asarray, old)
  ck = checkpoint.Checkpointer(os.path.join(tmp_path, "ck"), async_save=False)
  ck.save(1, old, force=True)
  ck.wait()
  ck.close()
  abstract = pretrain.abstract_train_state(cfg, mesh, sharding.rules_from_config(cfg))
  restored_step, restored = checkpoint.Checkpointer(
      os.path.join(tmp_path, "ck"), read_only=True).restore(abstract)
  assert restored_step == 1
  chex.assert_trees_all_equal(expected, jax.tree.map(np.asarray, restored))
  assert max(float(np.abs(x).max()) for x in jax.tree.leaves(expected.opt_state)) > 0
  _check_opt_specs_equal_param_specs(restored)
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(restored.opt_state))
