"""`fszjax adapt` with a backbone trained from scratch (``fewshot.backbone='conv4'``): the
MAML paper's Conv-4 meta-trained on the train split (MAML / FOMAML / Reptile / ANIL /
Meta-SGD / ProtoNets from `fszjax.fewshot.meta`), then evaluated with the pixel baseline."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fszjax.data import arrays as arrays_lib
from fszjax.data.episodes import EpisodeSampler
from fszjax.fewshot import conv4
from fszjax.fewshot import inner as inner_lib
from fszjax.fewshot import meta as meta_lib
from fszjax.fewshot.episodes import (AdaptError, make_sampler, parse_setting, pixel_vectors,
                                     proto_logits, run_episodes, summarize)
from fszjax.fewshot.meta_loop import local_devices, meta_train, tasks_of

log = logging.getLogger("fszjax")


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  if images.shape[1] == size:
    return images
  out = jax.image.resize(jnp.asarray(images), (images.shape[0], size, size, images.shape[3]),
                         "linear", antialias=True)
  return np.asarray(out)


def _meta_cfg(fcfg, n_way: int) -> meta_lib.MetaConfig:
  m = fcfg.meta
  return meta_lib.MetaConfig(
      algorithm=m.algorithm, n_way=n_way, inner_steps=int(m.inner_steps),
      inner_lr=float(m.inner_lr), adapt=m.adapt, first_order=bool(m.first_order),
      remat=bool(m.remat), head_init=m.head_init,
      eval_inner_steps=int(m.eval_inner_steps) or None,
      eval_inner_lr=float(m.eval_inner_lr) or None, task_chunk=int(m.task_chunk))


def rotation_classes(images: np.ndarray, labels: np.ndarray,
                     rotations: list[int]) -> tuple[np.ndarray, np.ndarray]:
  """Class augmentation by rotation (the Omniglot convention): every rotation in degrees
  (multiples of 90, 0 = the originals) turns each class into a new class.

  Returns ``(images, labels)`` with ``len(rotations)`` times as many of each; rotation i
  of class c gets label ``c + i * num_classes``.
  """
  rotations = [int(r) for r in rotations]
  if not rotations or any(r % 90 for r in rotations) or len(set(r % 360 for r in rotations)) < len(rotations):
    raise AdaptError(f"config.fewshot.meta.rotations={rotations} must be distinct multiples of "
                     "90 degrees, e.g. [0] (none) or [0, 90, 180, 270]")
  if rotations == [0]:
    return images, labels
  labels = np.asarray(labels)
  n_cls = int(labels.max()) + 1
  xs = [np.rot90(images, (r // 90) % 4, axes=(1, 2)) for r in rotations]
  ys = [labels + i * n_cls for i in range(len(rotations))]
  return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


def chunked(fn: Callable, chunk: int, devices: int = 1) -> Callable:
  """``fn`` over a leading task axis, jitted: one vmap (chunk 0), or a `lax.map` over groups
  of `chunk` vmapped tasks (faster on CPU: a group's activations stay in cache). With
  ``devices > 1`` the task axis is split over that many local devices (`jax.shard_map`),
  each running its share the same way. Pads the task axis as needed and drops the padding
  from the result. `fn` may close over arrays (replicated)."""

  def local(tasks):
    if chunk <= 0:
      return jax.vmap(fn)(tasks)
    t = jax.tree.leaves(tasks)[0].shape[0]
    pad = -t % chunk
    padded = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, 0)]), tasks)
    grouped = jax.tree.map(lambda a: a.reshape((-1, chunk) + a.shape[1:]), padded)
    out = jax.lax.map(jax.vmap(fn), grouped)
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:])[:t], out)

  if devices <= 1:
    return jax.jit(local)
  mesh = jax.make_mesh((devices,), ("tasks",), devices=jax.local_devices()[:devices],
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("tasks"), out_specs=P("tasks"),
                                  check_vma=False))

  def run(tasks):
    t = jax.tree.leaves(tasks)[0].shape[0]
    pad = -t % devices
    if pad:
      tasks = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], pad, 0)]), tasks)
    out = sharded(tasks)
    return jax.tree.map(lambda a: a[:t], out)

  return run


def _meta_train_conv4(config, workdir):
  """Meta-trains Conv-4 on the train split: ``(meta_params, features_fn, mcfg)``."""
  fcfg, m = config.fewshot, config.fewshot.meta
  size = int(fcfg.image_size)
  train = arrays_lib.load_split_arrays(config.data, config.data.train_split,
                                       fcfg.max_train_examples or None)
  train_x, train_y = rotation_classes(_resize(train["image"], size), train["label"],
                                      list(m.rotations))
  n_way_train, k_train = parse_setting(m.train_setting)
  sampler = EpisodeSampler(train_x, train_y, n_way=n_way_train, k_shot=k_train,
                           q_query=int(m.q_query), seed=config.seed)
  features_fn = conv4.make_conv4_features_fn(m.formulation, pool=m.pool,
                                             compute_dtype=m.compute_dtype)
  mcfg = _meta_cfg(fcfg, n_way_train)
  params = conv4.init_conv4(jax.random.key(config.seed), n_way_train, hidden=int(m.hidden),
                            layers=int(m.layers), norm=m.norm, image_size=size, pool=m.pool)
  meta_params = meta_lib.init_meta_params(mcfg, params)
  meta_params = meta_train(config, os.path.join(workdir, "checkpoints"), features_fn, mcfg,
                           meta_params, lambda step: tasks_of(sampler.sample(step, int(m.meta_batch))))
  return meta_params, features_fn, mcfg


def _conv4_evaluators(config, meta_params, features_fn, mcfg) -> Callable:
  """``evaluator(n_way) -> (meta-learner accuracy of tasks, pixel ProtoNets accuracy)``,
  jitted once per N (reused across splits: same program)."""
  fcfg, m = config.fewshot, config.fewshot.meta
  evaluators: dict[int, tuple[Callable, Callable]] = {}

  def evaluator(n_way: int):
    if n_way not in evaluators:
      ecfg = dataclasses.replace(mcfg, n_way=n_way).for_eval()
      frozen = jax.lax.stop_gradient(meta_params)
      ev = chunked(lambda t: meta_lib.task_loss(frozen, t, features_fn=features_fn,
                                                cfg=ecfg)[1]["acc"],
                   int(fcfg.eval_chunk), local_devices(m))
      proto = jax.jit(jax.vmap(
          lambda ps, ys, pq, yq: inner_lib.accuracy(proto_logits(ps, ys, pq, n_way), yq)))
      evaluators[n_way] = ev, proto
    return evaluators[n_way]

  return evaluator


def run_conv4(config, workdir) -> dict:
  fcfg, m = config.fewshot, config.fewshot.meta
  size = int(fcfg.image_size)
  meta_params, features_fn, mcfg = _meta_train_conv4(config, workdir)
  evaluator = _conv4_evaluators(config, meta_params, features_fn, mcfg)
  learner, pixels = f"conv4_{m.algorithm}", f"pixels_protonet_{size}px"
  methods: dict = {}
  for split in fcfg.splits:
    arrays = arrays_lib.load_split_arrays(config.data, split, fcfg.max_examples or None)
    x = _resize(arrays["image"], size)
    pix = pixel_vectors(x)
    for setting in fcfg.settings:
      n_way, k_shot = parse_setting(setting)
      smp = make_sampler(np.arange(len(x)), arrays["label"], n_way, k_shot, int(fcfg.q_query),
                         config.seed + 17, f"{split} {setting}")
      if smp is None:
        continue
      if mcfg.head_init == "learned" and n_way != mcfg.n_way:
        raise AdaptError(f"a learned {mcfg.n_way}-way head cannot run {setting}; use "
                         "config.fewshot.meta.head_init='zeros'")
      ev, proto = evaluator(n_way)

      def one_batch(ep, x=x, pix=pix, ev=ev, proto=proto):
        si, qi = ep["support_x"], ep["query_x"]
        task = {"support_x": x[si], "support_y": ep["support_y"], "query_x": x[qi],
                "query_y": ep["query_y"]}
        return {learner: ev(task),
                pixels: proto(pix[si], ep["support_y"], pix[qi], ep["query_y"])}

      accs = run_episodes(smp, int(fcfg.episodes), int(fcfg.episode_batch), one_batch)
      for name, a in accs.items():
        methods.setdefault(name, {}).setdefault(split, {})[setting] = summarize(a)
      log.info("%s %s: %s %.3f, pixels %.3f", split, setting, m.algorithm,
               methods[learner][split][setting]["mean"], methods[pixels][split][setting]["mean"])
  return {"methods": methods, "meta_training": {"steps": int(m.steps), "algorithm": m.algorithm,
                                                "train_setting": m.train_setting}}
