"""Per-episode fine-tuning of the image tower in `fszjax adapt` (opt-in:
``fewshot.transfer.finetune.enabled``): `transfer.tower_finetune` (the zero-shot + prototype
head and the last k blocks, or the whole tower, fine-tuned by SGD on each episode's support
set: first-order Proto-MAML over the towers) and `transfer.lp_ft` (linear probe, then
fine-tuning).

Unlike the methods on frozen features these run the tower forward and backward in every
episode, so they take their own, smaller episode count (``finetune.episodes``; the first
episodes of the same samplers as the other methods) and run `finetune.task_chunk` tasks at a
time. Their steps, rate and adapted part are chosen per setting on cross-font episodes of
the selection split (``transfer.val_split``) by the lowest query log-loss, like the
frozen-feature methods; never on test splits.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable

import jax
import numpy as np

from fszjax.fewshot import inner as inner_lib
from fszjax.fewshot import meta as meta_lib
from fszjax.fewshot import transfer
from fszjax.fewshot.episodes import (AdaptError, SplitData, chunked, parse_setting,
                                     run_episodes, summarize)
from fszjax.fewshot.meta_loop import local_devices

log = logging.getLogger("fszjax")

TUNING_METHODS = ("tower_finetune", "lp_ft")


def parse_adapt(value: Any) -> Any:
  """A ``finetune.adapts`` entry: an int k (the last k blocks + head) or 'all'."""
  if isinstance(value, str) and value.strip().isdigit():
    return int(value)
  if isinstance(value, int) or value == "all":
    return value
  raise AdaptError(f"config.fewshot.transfer.finetune.adapts: {value!r} is not a number of "
                   "last blocks (e.g. 1) or 'all'")


def check_config(ft) -> list:
  """``fewshot.transfer.finetune``'s methods and adapted parts, checked before any work;
  returns the parsed ``adapts``."""
  unknown = sorted(set(ft.methods) - set(TUNING_METHODS))
  if unknown:
    raise AdaptError(f"config.fewshot.transfer.finetune.methods: unknown {unknown}; choose from "
                     f"{', '.join(TUNING_METHODS)}")
  if not ft.methods or not ft.adapts or not ft.steps or not ft.lrs:
    raise AdaptError("config.fewshot.transfer.finetune: methods, adapts, steps and lrs must be "
                     "non-empty lists (or set finetune.enabled=False)")
  return [parse_adapt(a) for a in ft.adapts]


@functools.lru_cache(maxsize=None)
def _tuning_fn(method: str, features_fn: Callable, n_way: int, steps: int, adapt: Any,
               lp_steps: int, chunk: int, devices: int) -> Callable:
  """``run(tasks, {"backbone", "hp"}) -> {"acc": (T,), "nll": (T,)}`` (`episodes.chunked`):
  one compiled program per static setting, whatever the rates and the backbone."""

  def one(task, shared):
    backbone, hp = shared["backbone"], shared["hp"]
    if method == "tower_finetune":
      logits = transfer.tower_finetune(
          features_fn, backbone, task, n_way=n_way, scale=hp["scale"], bias=hp["bias"],
          proto_weight=hp["proto_weight"], steps=steps, lr=hp["lr"], adapt=adapt)
    else:
      logits = transfer.lp_ft(features_fn, backbone, task, n_way=n_way, scale=hp["scale"],
                              lp_steps=lp_steps, lp_lr=hp["lp_lr"], ft_steps=steps,
                              ft_lr=hp["lr"], adapt=adapt)
    yq = task["query_y"]
    return {"acc": inner_lib.accuracy(logits, yq), "nll": inner_lib.cross_entropy(logits, yq)}

  return chunked(one, chunk, devices)


def _image_tasks(d: SplitData, ep: dict) -> dict:
  """A batch of episodes drawn over `d`'s indices, as image tasks with class text."""
  return {"support_x": d.images[ep["support_x"]], "support_y": ep["support_y"],
          "query_x": d.images[ep["query_x"]], "query_y": ep["query_y"],
          "text_emb": d.text[ep["classes"]]}


def _evaluate(config, run: Callable, shared, data: dict[str, SplitData], setting: str,
              samplers: dict) -> dict:
  """``{split: summary}``: ``run(tasks, shared)["acc"]`` on the first
  ``transfer.finetune.episodes`` episodes of each split's sampler for `setting` (the same
  episodes, in the same batches, as the frozen-feature methods' first ones)."""
  fcfg = config.fewshot
  out = {}
  for split, d in data.items():
    sampler = samplers.get((split, setting, config.seed))
    if sampler is None:
      continue
    accs = run_episodes(sampler, int(fcfg.transfer.finetune.episodes), int(fcfg.episode_batch),
                        lambda ep, d=d: {"acc": run(_image_tasks(d, ep), shared)["acc"]})
    out[split] = summarize(accs["acc"])
  return out


def run_tuning(config, features_fn: Callable, backbone, pools: dict,
               data: dict[str, SplitData], scale: float, bias: float, samplers: dict) -> dict:
  """Selection on the val pools (`fszjax.fewshot.towers.selection_pools`, with their
  images), then evaluation on the splits of `data` (with their images).
  Returns ``{"methods": {method: {split: {setting: summary}}}, "finetune_selection": ...}``."""
  fcfg, tcfg = config.fewshot, config.fewshot.transfer
  ft = tcfg.finetune
  adapts = check_config(ft)
  chunk, devices = max(1, int(ft.task_chunk)), local_devices(fcfg.meta)
  (_, sl, sd), (_, ql, qd) = pools["support"], pools["query"]
  sup_images, q_images = pools["images"]
  methods: dict = {}
  chosen: dict = {}
  for setting in fcfg.settings:
    n_way, k_shot = parse_setting(setting)
    eps = transfer.cross_font_episodes(sl, sd, ql, qd, n_way=n_way, k_shot=k_shot,
                                       episodes=int(ft.val_episodes), seed=config.seed + 202)
    if eps is None:
      log.warning("finetune: %s has too few classes for %s; skipped", tcfg.val_split, setting)
      continue
    val_tasks = {"support_x": sup_images[eps["support"]], "support_y": eps["support_y"],
                 "query_x": q_images[eps["query"]], "query_y": eps["query_y"],
                 "text_emb": pools["text"][eps["classes"]]}
    for method in ft.methods:
      def program(c, method=method, n_way=n_way):
        run = _tuning_fn(method, features_fn, n_way, int(c["steps"]), c["adapt"],
                         int(ft.lp_steps), chunk, devices)
        hp = {k: np.float32(v) for k, v in dict(scale=scale, bias=bias, lr=c["lr"],
                                                 proto_weight=ft.proto_weight,
                                                 lp_lr=ft.lp_lr).items()}
        return run, {"backbone": backbone, "hp": hp}

      def score(c, program=program, val_tasks=val_tasks):
        run, shared = program(c)
        return {k: float(np.mean(v)) for k, v in run(val_tasks, shared).items()}

      cands = transfer.grid({"adapt": adapts, "steps": list(ft.steps), "lr": list(ft.lrs)})
      best = transfer.select_on_val(score, cands, f"{method} {setting}")
      chosen.setdefault(setting, {})[method] = best
      for split, summary in _evaluate(config, *program(best), data, setting, samplers).items():
        methods.setdefault(method, {}).setdefault(split, {})[setting] = summary
  return {"methods": methods, "finetune_selection": chosen}


def evaluate_inner_loop(config, features_fn: Callable, meta_params, mcfg: meta_lib.MetaConfig,
                        data: dict[str, SplitData], samplers: dict) -> dict:
  """``{split: {setting: summary}}`` of the meta-learner's own inner loop
  (`meta.task_loss` with ``mcfg.for_eval()``, as Conv-4 is evaluated) on each episode's
  images: for MAML / FOMAML whose inner loop adapts tower blocks, which re-encoded features
  cannot show. On the first ``transfer.finetune.episodes`` episodes of the other methods."""
  fcfg = config.fewshot
  chunk, devices = max(1, int(fcfg.transfer.finetune.task_chunk)), local_devices(fcfg.meta)
  out: dict = {}
  for setting in fcfg.settings:
    n_way, _ = parse_setting(setting)
    ecfg = dataclasses.replace(mcfg, n_way=n_way).for_eval()
    run = chunked(lambda t, mp, ecfg=ecfg: meta_lib.task_loss(
        jax.lax.stop_gradient(mp), t, features_fn=features_fn, cfg=ecfg)[1], chunk, devices)
    for split, summary in _evaluate(config, run, meta_params, data, setting, samplers).items():
      out.setdefault(split, {})[setting] = summary
  return out
