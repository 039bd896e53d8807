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

from fszjax.data import arrays as arrays_lib
from fszjax.data.episodes import EpisodeSampler
from fszjax.fewshot import conv4
from fszjax.fewshot import inner as inner_lib
from fszjax.fewshot import meta as meta_lib
from fszjax.fewshot.episodes import (AdaptError, chunked, make_sampler, parse_setting,
                                     pixel_vectors, proto_logits, run_episodes, summarize)
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
      ev = chunked(lambda t, _: meta_lib.task_loss(frozen, t, features_fn=features_fn,
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
