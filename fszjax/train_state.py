"""The contrastive train state: `TrainState`, the optimizer (AdamW with a decay mask, warmup
+ cosine schedule, frozen parameters), sharded initialisation in place, the abstract state
a checkpoint restores into, and copying parameters from another run (`init_params_from`).
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh

from fszjax import checkpoint, sharding
from fszjax.models.two_tower import TwoTower, build_model
from fszjax.tree import flatten, path_str


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


# ----------------------------------------------------------------------------- optimizer


def decay_mask(params):
  """True for weights that get weight decay: kernels and embeddings (not norms, biases,
  position embeddings, class tokens, probes, logit scale/bias)."""
  def one(path, _):
    last = path_str(path).split("/")[-1]
    return last in ("kernel", "embedding")
  return jax.tree_util.tree_map_with_path(one, params)


def frozen_labels(params, patterns) -> Any:
  """'frozen' for params whose path matches any regex in `patterns`, else 'trained'."""
  regs = [re.compile(p) for p in patterns]

  def one(path, _):
    s = path_str(path)
    return "frozen" if any(r.search(s) for r in regs) else "trained"
  return jax.tree_util.tree_map_with_path(one, params)


def make_schedule(ocfg, total_steps: int) -> optax.Schedule:
  warmup = int(ocfg.warmup_steps)
  lr = float(ocfg.lr)
  kind = ocfg.schedule
  end = lr * float(ocfg.min_lr_ratio)
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=max(warmup, 0), decay_steps=max(total_steps, warmup + 1),
        end_value=end)
  if kind == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup])
  raise ValueError(f"unknown config.optim.schedule {kind!r}; use 'cosine' or 'constant'")


def make_optimizer(ocfg, total_steps: int, freeze: tuple[str, ...] = ()):
  """AdamW (decay mask) after global-norm clipping, with a warmup + cosine schedule.

  Params matching a regex in `freeze` get zero updates (e.g. LiT's image tower).
  Returns ``(tx, schedule)``.
  """
  schedule = make_schedule(ocfg, total_steps)
  parts = []
  if ocfg.clip_norm:
    parts.append(optax.clip_by_global_norm(float(ocfg.clip_norm)))
  parts.append(optax.adamw(
      schedule, b1=float(ocfg.b1), b2=float(ocfg.b2), eps=float(ocfg.eps),
      weight_decay=float(ocfg.wd), mask=decay_mask))
  tx = optax.chain(*parts)
  if freeze:
    tx = optax.multi_transform(
        {"trained": tx, "frozen": optax.set_to_zero()},
        functools.partial(frozen_labels, patterns=tuple(freeze)))
  return tx, schedule


# ----------------------------------------------------------------------------- init


def input_shapes(config, batch: int = 1):
  # model.image.image_size / channels 0: the data section's (free-form: may lack them).
  d = config.data if "data" in config else {}
  size = config.model.image.image_size or d.get("image_size", 224)
  channels = config.model.image.channels or d.get("channels", 3)
  return (batch, size, size, channels), (batch, config.model.text.max_len)


def _state_parts(config, model: TwoTower | None = None):
  model = model or build_model(config.model)
  tx, schedule = make_optimizer(config.optim, config.total_steps,
                                tuple(config.optim.freeze or ()))
  img_shape, tok_shape = input_shapes(config)

  def init_boxed(rng_data):
    rng = jax.random.wrap_key_data(rng_data)
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros(img_shape, jnp.float32),
                        jnp.zeros(tok_shape, jnp.int32))["params"]
    return params, jax.random.key_data(state_rng)

  return model, tx, schedule, init_boxed


def _seed_data(config):
  return jax.random.key_data(jax.random.key(config.seed))


def abstract_train_state(config, mesh: Mesh, rules, model: TwoTower | None = None):
  """Abstract TrainState: `ShapeDtypeStruct`s carrying their shardings on `mesh`.

  Parameters are sharded by their logical axes through `rules`; every optimizer-state
  leaf that mirrors a parameter (Adam's moments) is sharded like that parameter, and
  counters are replicated (`sharding.optimizer_state_shardings`). Used both to
  initialise in place and as the restore target of a checkpoint written on any other
  mesh or with any other layout (e.g. the replicated optimizer state of older
  checkpoints). Nothing is materialised.
  """
  model, tx, _, init_boxed = _state_parts(config, model)
  abstract_boxed, abstract_rng = jax.eval_shape(init_boxed, _seed_data(config))
  param_sh = sharding.logical_to_sharding(nn.get_partition_spec(abstract_boxed), mesh, rules)
  abstract_params = jax.tree.map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
      nn.unbox(abstract_boxed), param_sh)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sh = sharding.optimizer_state_shardings(tx, abstract_opt, abstract_params, mesh)
  abstract_opt = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                              abstract_opt, opt_sh)
  rep = sharding.replicated(mesh)
  return TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=abstract_params,
      opt_state=abstract_opt,
      rng=jax.ShapeDtypeStruct(abstract_rng.shape, abstract_rng.dtype, sharding=rep))


def create_train_state(config, mesh: Mesh, rules, model: TwoTower | None = None):
  """Builds the model, optimizer and a sharded TrainState, initialised in place (no device
  ever holds more than its shards). Returns ``(state, model, tx, schedule)``.

  The state's ``rng`` is raw key data (uint32), which checkpoints portably.
  """
  model, tx, schedule, init_boxed = _state_parts(config, model)
  abstract = abstract_train_state(config, mesh, rules, model)
  shardings = sharding.shardings_of(abstract)

  def init(rng_data):
    boxed, state_rng = init_boxed(rng_data)
    params = nn.unbox(boxed)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=state_rng)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(init, out_shardings=shardings)(_seed_data(config))
  return state, model, tx, schedule



def init_params_from(state: TrainState, path: str, keys: str = "") -> tuple[TrainState, int]:
  """Copies params from another run's checkpoint into `state` (all, or those whose path
  matches the regex `keys`, e.g. ``^img/`` for LiT). Shapes must agree."""
  src = checkpoint.load_params_numpy(path)
  src_flat = flatten(src)
  reg = re.compile(keys) if keys else None
  copied = 0
  missing: list[str] = []

  def one(p, x):
    nonlocal copied
    name = path_str(p)
    if reg is not None and not reg.search(name):
      return x
    if name not in src_flat:
      if reg is not None:
        raise checkpoint.CheckpointError(
            f"init_from {path}: parameter {name} is missing there; adjust config.init_keys")
      missing.append(name)
      return x
    v = np.asarray(src_flat[name])
    if v.shape != x.shape:
      raise checkpoint.CheckpointError(
          f"init_from {path}: {name} has shape {v.shape} there but {x.shape} here; the "
          "towers' configs must match")
    copied += 1
    return jax.device_put(v.astype(x.dtype), x.sharding)

  params = jax.tree_util.tree_map_with_path(one, state.params)
  if copied == 0:
    raise checkpoint.CheckpointError(f"init_from {path}: no parameter matched {keys or 'any'}; "
                                     "check config.model.scan_layers matches the source")
  if missing:
    logging.getLogger("fszjax").warning(
        "init_from %s: %d parameter arrays are not in the source and keep their initial "
        "values (first: %s); a scanned vs per-block layout mismatch shows up this way",
        path, len(missing), missing[0])
  return state.replace(params=params), copied
