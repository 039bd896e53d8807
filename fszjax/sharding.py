"""Device meshes, logical-axis rules, shardings of states and global batches.

Mesh axes are always ``("data", "fsdp", "tensor")``. Model code names array dimensions
with *logical* axes (``"embed"``, ``"mlp"``, ``"heads"``, ``"batch"``, ...); a single
rules table (kept in the config, MaxText style) maps them to mesh axes.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from optax.transforms import MaskedNode

from fszjax import config_defaults
from fszjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
# Axes the global batch is split over (data parallelism in both its flavours).
BATCH_AXES = ("data", "fsdp")

# Default logical-to-mesh rules (`fszjax.config_defaults.SHARDING_RULES`, defined there
# once). Parameters are sharded over `fsdp` along their embedding dimension (ZeRO-3 style)
# and over `tensor` along heads / MLP hidden / vocabulary (Megatron style). Activations use
# the `act_*` names.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = config_defaults.SHARDING_RULES


class ShardingError(UserError):
  """A mesh or batch does not fit the devices; the message names the fix."""


def resolve_mesh_shape(
    data: int, fsdp: int, tensor: int, num_devices: int
) -> tuple[int, int, int]:
  """Resolves one `-1` entry to "the remaining devices" and checks the product."""
  dims = [int(data), int(fsdp), int(tensor)]
  if dims.count(-1) > 1:
    raise ShardingError(f"mesh {dims}: at most one axis may be -1 (the rest of the devices)")
  for d in dims:
    if d == 0 or d < -1:
      raise ShardingError(f"mesh {dims}: axis sizes must be positive or -1")
  known = int(np.prod([d for d in dims if d != -1]))
  if -1 in dims:
    if num_devices % known:
      raise ShardingError(
          f"mesh {dims}: {num_devices} devices are not divisible by {known}; "
          "change config.mesh.{data,fsdp,tensor}")
    dims[dims.index(-1)] = num_devices // known
  if int(np.prod(dims)) != num_devices:
    raise ShardingError(
        f"mesh data={dims[0]} fsdp={dims[1]} tensor={dims[2]} needs {int(np.prod(dims))} "
        f"devices but {num_devices} are available; set config.mesh.* so the product is "
        f"{num_devices} (or use -1 for one axis)")
  return tuple(dims)  # type: ignore[return-value]


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
  """A `(data, fsdp, tensor)` mesh with Auto axis types (Linen's logical constraints need them)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  arr = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def mesh_from_config(mesh_cfg, devices=None) -> Mesh:
  return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices=devices)


def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
  """The config's `sharding_rules` (list of [logical, mesh axis or list or None]) as a tuple."""
  rules = config.sharding_rules
  if not rules:
    return DEFAULT_RULES
  out = []
  for name, axes in rules:
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)


def data_parallel_size(mesh: Mesh) -> int:
  """The number of shards of the global batch: the product of the batch axes' sizes."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of an array whose leading dimension is the global batch."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_global_batch(global_batch: int, mesh: Mesh, what: str = "config.batch_size") -> None:
  n = data_parallel_size(mesh)
  if global_batch % n:
    raise ShardingError(
        f"{what}={global_batch} is not divisible by the data-parallel size {n} "
        f"(mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); "
        f"use a multiple of {n}")


def logical_to_sharding(logical_specs, mesh: Mesh, rules) -> Any:
  """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def host_to_global(batch, mesh: Mesh, global_batch: int | None = None):
  """Turns this process's numpy batch (a pytree) into global arrays sharded over the batch axes.

  Each process passes only its own rows (``global_batch / process_count`` of them); the
  result is one `jax.Array` per leaf with leading dimension ``global_batch``.
  """

  def one(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    gshape = (global_batch or x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, gshape)

  return jax.tree.map(one, batch)


def shardings_of(tree):
  """The `.sharding` of every array leaf (for jit in/out shardings)."""
  return jax.tree.map(lambda x: x.sharding, tree)



def optimizer_state_shardings(tx, abstract_opt_state, abstract_params, mesh: Mesh):
  """Shardings of an optax state: every copy of the parameter tree inside it (Adam's mu
  and nu, momentum, ...) gets the parameters' shardings leaf by leaf; everything else
  (step counters, scalars, per-transform bookkeeping) is replicated.

  `abstract_params` are `jax.ShapeDtypeStruct`s carrying the parameters' shardings. The
  copies are found through the state's tree structure with `optax.tree_map_params`, so
  any chain works, including masked transforms (their masked-out leaves are
  `MaskedNode`s, which hold no array) and `multi_transform` with frozen parameters. A
  state leaf whose shape differs from its parameter's (e.g. a factored second moment) is
  replicated.
  """
  rep = replicated(mesh)

  def like_param(leaf, param):
    if isinstance(leaf, MaskedNode):
      return leaf
    return param.sharding if tuple(leaf.shape) == tuple(param.shape) else rep

  return optax.tree_map_params(
      tx, like_param, abstract_opt_state, abstract_params,
      transform_non_params=lambda value: jax.tree.map(lambda _: rep, value),
      is_leaf=lambda x: isinstance(x, MaskedNode))
