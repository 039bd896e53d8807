"""Few-shot episodes on precomputed features: samplers, the jitted per-episode methods, and
the ``{method: {split: {setting: summary}}}`` tables of `fszjax adapt`.

Episodes run on features (the towers are frozen), so hundreds of episodes per setting take
seconds; `few_shot_table` evaluates every split and ``NwayKshot`` setting of a config.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fszjax import metrics as metrics_lib
from fszjax.data.episodes import EpisodeError, EpisodeSampler
from fszjax.errors import UserError
from fszjax.fewshot import dg as dg_lib
from fszjax.fewshot import inner as inner_lib
from fszjax.fewshot import meta as meta_lib

log = logging.getLogger("fszjax")


class AdaptError(UserError):
  """A few-shot config or input is wrong; the message names the fix."""


def parse_setting(s: str) -> tuple[int, int]:
  m = re.fullmatch(r"(\d+)way(\d+)shot", s)
  if not m:
    raise AdaptError(f"setting {s!r} must look like '5way1shot'")
  return int(m.group(1)), int(m.group(2))


def summarize(acc: np.ndarray) -> dict:
  """Mean and 95% confidence half-width of per-episode accuracies."""
  acc = np.asarray(acc, np.float64)
  n = len(acc)
  sd = float(acc.std(ddof=1)) if n > 1 else 0.0
  return {"mean": float(acc.mean()), "ci95": 1.96 * sd / math.sqrt(max(n, 1)), "episodes": n}


def pixel_vectors(images: np.ndarray) -> np.ndarray:
  """(N, ...) images -> (N, P) pixel vectors of unit L2 norm (the pixel baseline's features)."""
  pix = images.reshape(len(images), -1)
  return pix / np.maximum(np.linalg.norm(pix, axis=1, keepdims=True), 1e-6)


def replace_config(cfg, **kw):
  """A copy of a ConfigDict with some keys replaced (types may change)."""
  c = cfg.copy_and_resolve_references()
  for k, v in kw.items():
    with c.ignore_type():
      c[k] = v
  return c


def make_sampler(index, labels, n_way, k_shot, q_query, seed, what):
  """An `EpisodeSampler`, lowering the queries per class (down to 1) when the split has too
  few examples per class (held-out fonts cover few characters many times); None if even
  one query is impossible."""
  for q in range(q_query, 0, -1):
    try:
      smp = EpisodeSampler(index, labels, n_way=n_way, k_shot=k_shot, q_query=q, seed=seed)
    except EpisodeError as e:
      err = e
      continue
    if q < q_query:
      log.info("%s: %d queries per class (the split has too few examples for %d)", what, q,
               q_query)
    return smp
  log.warning("%s skipped: %s", what, err)
  return None


def proto_logits(fs, ys, fq, n_way):
  """ProtoNets logits of query features `fq` against the class means of `fs`."""
  return meta_lib.proto_logits(lambda _, x: x, None,
                               {"support_x": fs, "support_y": ys, "query_x": fq}, n_way)


def make_episode_eval(n_way: int, scale: float, bias: float, fcfg) -> Callable:
  """jitted ``f(fs, ys, fq, yq, text, ps, pq) -> {method: acc (T,)}`` over T tasks.

  fs/fq: (T, S|Q, E) normalised features; text: (T, N, E) normalised class text
  embeddings; ps/pq: (T, S|Q, P) pixel vectors. The same arguments give the same jitted
  function, so the many tables of a run (splits, meta-trained tower, DG variants) compile
  each task shape once.
  """
  return _episode_eval(int(n_way), float(scale), float(bias), int(fcfg.head_steps),
                       float(fcfg.head_lr), int(fcfg.probe_steps), float(fcfg.probe_lr))


@functools.lru_cache(maxsize=None)
def _episode_eval(n_way: int, scale: float, bias: float, steps: int, lr: float,
                  probe_steps: int, probe_lr: float) -> Callable:
  acc = inner_lib.accuracy

  def one(fs, ys, fq, yq, text, ps, pq):
    head0 = inner_lib.zeroshot_head(text, scale, bias)
    out = {"zeroshot": acc(inner_lib.linear_head(head0, fq), yq),
           "protonet": acc(proto_logits(fs, ys, fq, n_way), yq),
           "pixels_protonet": acc(proto_logits(ps, ys, pq, n_way), yq)}
    head, _ = inner_lib.inner_loop(
        lambda h: inner_lib.cross_entropy(inner_lib.linear_head(h, fs), ys), head0,
        steps=steps, lr=lr)
    out["zs_head_adapt"] = acc(inner_lib.linear_head(head, fq), yq)
    out["wise_ft"] = acc(inner_lib.linear_head(dg_lib.wise_ft(head0, head, 0.5), fq), yq)
    zero = inner_lib.zeros_head(fs.shape[-1], n_way, fs.dtype)
    probe, _ = inner_lib.inner_loop(
        lambda h: inner_lib.cross_entropy(inner_lib.linear_head(h, fs * scale), ys), zero,
        steps=probe_steps, lr=probe_lr)
    out["linear_probe"] = acc(inner_lib.linear_head(probe, fq * scale), yq)
    return out

  return jax.jit(jax.vmap(one))


def run_episodes(sampler, n_episodes: int, batch: int, fn: Callable[[dict], dict]) -> dict:
  """``{name: (n_episodes,) accuracies}``: `fn` over batches of at most `batch` episodes
  drawn by `sampler` (batch i is ``sampler.sample(i, ...)``); `fn(episode) -> {name: (T,)}``."""
  accs: dict[str, list] = {}
  done, index = 0, 0
  while done < n_episodes:
    t = min(batch, n_episodes - done)
    ep = sampler.sample(index, t)
    index += 1
    for k, v in fn(ep).items():
      accs.setdefault(k, []).append(np.asarray(v))
    done += t
  return {k: np.concatenate(v) for k, v in accs.items()}


def chunked(fn: Callable, chunk: int, devices: int = 1) -> Callable:
  """``run(tasks, shared=None)``: ``fn(task, shared)`` over the leading task axis of
  `tasks`, jitted: one vmap (chunk 0), or a `lax.map` over groups of `chunk` vmapped tasks
  (faster on CPU: a group's activations stay in cache). `shared` (any pytree: parameters,
  hyper-parameters) is passed to every task unbatched, as an argument of the compiled
  program, so calls that differ only in it reuse one program. With ``devices > 1`` the task
  axis is split over that many local devices (`jax.shard_map`; `shared` replicated), each
  running its share the same way. Pads the task axis as needed and drops the padding from
  the result."""

  def local(tasks, shared):
    per_task = jax.vmap(lambda t: fn(t, shared))
    if chunk <= 0:
      return per_task(tasks)
    t = jax.tree.leaves(tasks)[0].shape[0]
    pad = -t % chunk
    padded = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, 0)]), tasks)
    grouped = jax.tree.map(lambda a: a.reshape((-1, chunk) + a.shape[1:]), padded)
    out = jax.lax.map(per_task, grouped)
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:])[:t], out)

  if devices <= 1:
    compiled = jax.jit(local)
    return lambda tasks, shared=None: compiled(tasks, shared)
  mesh = jax.make_mesh((devices,), ("tasks",), devices=jax.local_devices()[:devices],
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("tasks"), P()),
                                  out_specs=P("tasks"), check_vma=False))

  def run(tasks, shared=None):
    t = jax.tree.leaves(tasks)[0].shape[0]
    pad = -t % devices
    if pad:
      tasks = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], pad, 0)]), tasks)
    out = sharded(tasks, shared)
    return jax.tree.map(lambda a: a[:t], out)

  return run


def episodes_on_features(sampler, n_episodes, batch, fn, feats, text, pix):
  """Runs `fn` (`make_episode_eval`'s signature) over `n_episodes` episodes drawn by
  `sampler` (indices into feats)."""

  def one_batch(ep):
    si, qi = ep["support_x"], ep["query_x"]  # indices (T, S), (T, Q)
    return fn(feats[si], ep["support_y"], feats[qi], ep["query_y"], text[ep["classes"]],
              pix[si], pix[qi])

  return run_episodes(sampler, n_episodes, batch, one_batch)


@dataclasses.dataclass
class SplitData:
  feats: np.ndarray  # (N, E) normalised image embeddings
  labels: np.ndarray
  domains: np.ndarray
  text: np.ndarray  # (C, E) zero-shot classifier rows of the split's classes
  pix: np.ndarray  # (N, P) normalised pixels
  class_names: list
  domain_names: list | None = None
  images: np.ndarray | None = None  # kept when the towers are meta-trained (re-encoded after)


def few_shot_table(data: dict[str, SplitData], fcfg, scale, bias, seed, transform=None,
                   methods=None, samplers: dict | None = None) -> dict:
  """{method: {split: {setting: summary}}} on (optionally transformed) features.

  `samplers`: a dict shared by calls on the same splits (labels) and seed, so each split's
  episode samplers are built once (the episodes depend only on labels and seed)."""
  out: dict = {}
  samplers = {} if samplers is None else samplers
  for split, d in data.items():
    feats = d.feats if transform is None else transform(d.feats)
    for setting in fcfg.settings:
      n_way, k_shot = parse_setting(setting)
      key = (split, setting, seed)
      if key not in samplers:
        samplers[key] = make_sampler(np.arange(len(feats)), d.labels, n_way, k_shot,
                                     int(fcfg.q_query), seed, f"{split} {setting}")
      sampler = samplers[key]
      if sampler is None:
        continue
      fn = make_episode_eval(n_way, scale, bias, fcfg)
      with metrics_lib.timed(f"few-shot {split} {setting}: {int(fcfg.episodes)} episodes", log):
        accs = episodes_on_features(sampler, int(fcfg.episodes), int(fcfg.episode_batch), fn,
                                    feats, d.text, d.pix)
      for m, a in accs.items():
        if methods is not None and m not in methods:
          continue
        out.setdefault(m, {}).setdefault(split, {})[setting] = summarize(a)
  return out


def zeroshot_top1(feats, d: SplitData) -> dict:
  """Zero-shot top-1 of features over the split's full class list (with its 95% interval)."""
  logits = feats @ d.text.T
  acc = (np.argmax(logits, 1) == d.labels).astype(np.float64)
  s = summarize(acc)
  return {"top1": s["mean"], "ci95": s["ci95"], "num_examples": len(acc),
          "num_classes": len(d.class_names), "chance": 1.0 / len(d.class_names)}
