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

import functools
import logging
from typing import Any, Callable

import jax
import numpy as np

from fszjax.fewshot import inner as inner_lib
from fszjax.fewshot import transfer
from fszjax.fewshot.episodes import AdaptError, SplitData, parse_setting, summarize

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
               lp_steps: int) -> Callable:
  """jitted ``f(backbone, task, hp) -> {"acc": (T,), "nll": (T,)}`` over T tasks."""

  def one(backbone, task, hp):
    if method == "tower_finetune":
      logits = transfer.tower_finetune(
          features_fn, backbone, task, n_way=n_way, scale=hp["scale"], bias=hp["bias"],
          proto_weight=hp["proto_weight"], steps=steps, lr=hp["lr"], adapt=adapt)
    else:
      logits = transfer.lp_ft(features_fn, backbone, task, n_way=n_way, scale=hp["scale"],
                              lp_steps=lp_steps, lp_lr=hp["lp_lr"], ft_steps=steps,
                              ft_lr=hp["lr"], adapt=adapt)
    yq = task["query_y"]
    return {"acc": inner_lib.accuracy(logits, yq), "nll": transfer.query_nll(logits, yq)}

  return jax.jit(jax.vmap(one, in_axes=(None, 0, None)))


def _run_chunked(fn: Callable, backbone, tasks: dict, chunk: int) -> dict:
  """`fn` over the tasks `chunk` at a time (the tower's activations of a whole evaluation
  batch of episodes would not fit)."""
  n = len(tasks["support_y"])
  out: dict[str, list] = {}
  for a in range(0, n, chunk):
    part = {k: v[a:a + chunk] for k, v in tasks.items()}
    for k, v in fn(backbone, part).items():
      out.setdefault(k, []).append(np.asarray(v))
  return {k: np.concatenate(v) for k, v in out.items()}


def _image_tasks(images: np.ndarray, text: np.ndarray, support, support_y, query, query_y,
                 classes) -> dict:
  return {"support_x": images[support], "support_y": np.asarray(support_y),
          "query_x": images[query], "query_y": np.asarray(query_y),
          "text_emb": text[classes]}


def _test_tasks(sampler, n_episodes: int, batch: int, d: SplitData):
  """The first `n_episodes` episodes of `sampler` as drawn by
  `fszjax.fewshot.episodes.run_episodes` with the same `batch`, as image tasks."""
  done, index = 0, 0
  while done < n_episodes:
    t = min(batch, n_episodes - done)
    ep = sampler.sample(index, t)
    index += 1
    done += t
    yield _image_tasks(d.images, d.text, ep["support_x"], ep["support_y"], ep["query_x"],
                       ep["query_y"], ep["classes"])


def run_tuning(config, features_fn: Callable, backbone, pools: dict,
               data: dict[str, SplitData], scale: float, bias: float, samplers: dict) -> dict:
  """Selection on the val pools (`fszjax.fewshot.towers.selection_pools`, with their
  images), then evaluation on the splits of `data` (with their images).
  Returns ``{"methods": {method: {split: {setting: summary}}}, "finetune_selection": ...}``."""
  fcfg, tcfg = config.fewshot, config.fewshot.transfer
  ft = tcfg.finetune
  adapts = check_config(ft)
  chunk = max(1, int(ft.task_chunk))
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
      def fn_of(c, method=method, n_way=n_way):
        f = _tuning_fn(method, features_fn, n_way, int(c["steps"]), c["adapt"], int(ft.lp_steps))
        hp = {k: np.float32(v) for k, v in dict(scale=scale, bias=bias, lr=c["lr"],
                                                 proto_weight=ft.proto_weight,
                                                 lp_lr=ft.lp_lr).items()}
        return lambda b, task: f(b, task, hp)

      def score(c, fn_of=fn_of, val_tasks=val_tasks):
        out = _run_chunked(fn_of(c), backbone, val_tasks, chunk)
        return {k: float(np.mean(v)) for k, v in out.items()}

      cands = transfer.grid({"adapt": adapts, "steps": list(ft.steps), "lr": list(ft.lrs)})
      best = transfer.select_on_val(score, cands, f"{method} {setting}")
      chosen.setdefault(setting, {})[method] = best
      fn = fn_of(best)
      for split, d in data.items():
        sampler = samplers.get((split, setting, config.seed))
        if sampler is None:
          continue
        accs = [_run_chunked(fn, backbone, tasks, chunk)["acc"] for tasks in
                _test_tasks(sampler, int(ft.episodes), int(fcfg.episode_batch), d)]
        methods.setdefault(method, {}).setdefault(split, {})[setting] = summarize(
            np.concatenate(accs))
  return {"methods": methods, "finetune_selection": chosen}


def evaluate_inner_loop(config, features_fn: Callable, backbone, data: dict[str, SplitData],
                        scale: float, bias: float, samplers: dict, *, steps: int, lr: float,
                        adapt: Any) -> dict:
  """``{split: {setting: summary}}`` of a fixed inner loop on each episode's images: `steps`
  SGD steps of `lr` from the zero-shot head, adapting the head and `adapt` (the last k
  blocks or 'all'), i.e. the inner loop that MAML / FOMAML meta-trained the tower for. On the
  first ``transfer.finetune.episodes`` episodes of the other methods' samplers."""
  fcfg, ft = config.fewshot, config.fewshot.transfer.finetune
  hp = {k: np.float32(v) for k, v in dict(scale=scale, bias=bias, lr=lr, proto_weight=0.0,
                                           lp_lr=0.0).items()}
  out: dict = {}
  for setting in fcfg.settings:
    n_way, _ = parse_setting(setting)
    f = _tuning_fn("tower_finetune", features_fn, n_way, int(steps), adapt, 0)
    for split, d in data.items():
      sampler = samplers.get((split, setting, config.seed))
      if sampler is None:
        continue
      accs = [_run_chunked(lambda b, t: f(b, t, hp), backbone, tasks, max(1, int(ft.task_chunk)))
              ["acc"] for tasks in _test_tasks(sampler, int(ft.episodes), int(fcfg.episode_batch), d)]
      out.setdefault(split, {})[setting] = summarize(np.concatenate(accs))
  return out

