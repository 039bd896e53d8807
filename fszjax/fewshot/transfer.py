"""Few-shot adaptation that uses everything a pretrained two-tower model offers.

All functions are pure functions of ONE task (``vmap`` them over episodes):

- `proto_zeroshot_head`: a linear head initialised from the zero-shot text embeddings AND
  the support prototypes (Proto-MAML's head ``w = 2c, b = -|c|^2`` mixed with the text
  classifier ``scale * text``). Weight 1 gives ProtoNets' decision rule exactly, weight 0
  the zero-shot classifier; SGD on the support set then fine-tunes it (`proto_zeroshot_adapt`).
- `support_cv_weight`: with >= 2 shots per class, the zero-shot / prototype mix of that
  head chosen per task by leave-one-out log-loss on the support set.
- `tip_adapter_logits`: training-free (Tip-Adapter, Zhang et al. 2022): the zero-shot
  logits plus ``alpha * exp(-beta (1 - cos(query, support))) @ onehot(support labels)``.
- `lp_ft`: LP-FT (Kumar et al. 2022): a linear probe on frozen features, then fine-tuning
  of the head and the last k image-tower blocks (`fszjax.fewshot.inner.adapt_mask`) from
  that probe.
- `tower_finetune`: the `proto_zeroshot_head` fine-tuned together with the last k blocks
  (or the whole tower) in the inner loop, i.e. first-order Proto-MAML over the towers.

Hyper-parameters are chosen by `select_on_val`, by the query log-loss on cross-font
episodes (`cross_font_episodes`) of a validation split: on Glyphs ``val_classes``,
characters the towers were never trained on (support and query in different fonts of that
split); never on test splits.
"""

from __future__ import annotations

import functools
import itertools
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fszjax.fewshot import inner as inner_lib

log = logging.getLogger("fszjax")


# ----------------------------------------------------------------------------- heads


def proto_head(fs: jax.Array, ys: jax.Array, n_way: int) -> dict:
  """ProtoNets as a linear head: logits ``2 f.c - |c|^2 = |f|^2 - |f - c|^2``."""
  return inner_lib.prototype_head(fs, ys, n_way)


def proto_zeroshot_head(fs: jax.Array, ys: jax.Array, text: jax.Array, n_way: int,
                        scale: float, bias: float, proto_weight: float) -> dict:
  """``(1 - a) * zero-shot head + a * scale * ProtoNets head`` (a = proto_weight).

  Both parts are linear in the (normalised) features, so the sum is one linear head that
  SGD can fine-tune; ``scale`` (the model's logit scale) puts the prototype logits on the
  zero-shot logits' temperature.
  """
  zs = inner_lib.zeroshot_head(text, scale, bias)
  ph = proto_head(fs, ys, n_way)
  a = proto_weight
  return {"w": (1.0 - a) * zs["w"] + a * scale * ph["w"],
          "b": (1.0 - a) * zs["b"] + a * scale * ph["b"]}


def support_gate(fs, ys, text, n_way: int) -> jax.Array:
  """How far the zero-shot classifier can be trusted on this task, from its support set
  alone: its chance-corrected support accuracy, clipped to [0, 1] (1: every support
  example named right; 0: no better than chance, e.g. on scripts the text tower never saw)."""
  acc = inner_lib.accuracy(fs @ inner_lib.l2_normalize(text).T, ys)
  return jnp.clip((acc - 1.0 / n_way) / (1.0 - 1.0 / n_way), 0.0, 1.0)


def gated_proto_weight(fs, ys, text, n_way: int, proto_weight: float) -> jax.Array:
  """``1 - (1 - proto_weight) * support_gate``: the zero-shot share shrinks to 0 on tasks
  whose support set the zero-shot classifier gets no better than chance."""
  return 1.0 - (1.0 - proto_weight) * support_gate(fs, ys, text, n_way)


def support_cv_weight(fs, ys, text, n_way: int, scale: float, weights: Sequence[float]
                      ) -> jax.Array:
  """The proto_weight of `proto_zeroshot_head`, chosen per task among `weights` by the
  leave-one-out log-loss on the support set (needs >= 2 shots per class).

  Each support example is classified by the mixed head built without it: its own class's
  prototype is the mean of that class's other shots, the other prototypes and the zero-shot
  classifier are as they are. Unlike `support_gate`, this weighs the zero-shot classifier
  against the prototypes on the task itself: on a new font whose shots differ in style the
  prototypes classify the left-out shot badly and the names win; on new characters in
  known styles the prototypes win. Ties go to the earlier weight."""
  oh = jax.nn.one_hot(ys, n_way, dtype=fs.dtype)  # (S, N)
  c = inner_lib.prototypes(fs, ys, n_way)  # (N, D)
  k = jnp.sum(oh, axis=0)[ys][:, None]  # shots of each support example's class
  c_own = (k * c[ys] - fs) / jnp.maximum(k - 1.0, 1.0)  # own prototype without the example
  proto = inner_lib.linear_head(proto_head(fs, ys, n_way), fs)  # (S, N): 2 f.c - |c|^2
  own = 2.0 * jnp.sum(fs * c_own, axis=-1) - jnp.sum(jnp.square(c_own), axis=-1)
  proto = jnp.where(oh > 0, own[:, None], proto)
  zs = fs @ inner_lib.l2_normalize(text).T  # the bias is the same for every class

  def loo_nll(a):
    logits = scale * ((1.0 - a) * zs + a * proto)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits, axis=-1) * oh, axis=-1))

  w = jnp.asarray(weights, fs.dtype)
  return w[jnp.argmin(jax.vmap(loo_nll)(w))]


def proto_zeroshot_adapt(fs, ys, fq, text, n_way: int, scale: float, bias: float,
                         proto_weight: float, steps: int, lr: float,
                         gate: bool = False, cv_weights: Sequence[float] | None = None
                         ) -> jax.Array:
  """Query logits of `proto_zeroshot_head` after `steps` SGD steps on the support set.
  gate: use `gated_proto_weight` (per task, from the support set) instead of proto_weight.
  cv_weights: choose the weight per task by `support_cv_weight` among these instead (the
  gate and proto_weight are then unused; needs >= 2 shots per class)."""
  head = proto_zeroshot_fit(fs, ys, text, n_way, scale, bias, proto_weight, steps, lr, gate,
                            cv_weights)
  return inner_lib.linear_head(head, fq)


def proto_zeroshot_fit(fs, ys, text, n_way: int, scale: float, bias: float,
                       proto_weight: float, steps: int, lr: float, gate: bool = False,
                       cv_weights: Sequence[float] | None = None) -> dict:
  """The linear head `proto_zeroshot_adapt` classifies the queries with (same arguments)."""
  if cv_weights:
    proto_weight = support_cv_weight(fs, ys, text, n_way, scale, cv_weights)
  elif gate:
    proto_weight = gated_proto_weight(fs, ys, text, n_way, proto_weight)
  head0 = proto_zeroshot_head(fs, ys, text, n_way, scale, bias, proto_weight)
  head, _ = inner_lib.inner_loop(
      lambda h: inner_lib.cross_entropy(inner_lib.linear_head(h, fs), ys), head0,
      steps=steps, lr=lr, first_order=True)
  return head


def tip_adapter_logits(fs, ys, fq, text, n_way: int, scale: float, bias: float,
                       alpha: float, beta: float, gate: bool = False) -> jax.Array:
  """Zero-shot logits + ``alpha * scale * exp(-beta (1 - fq.fs)) @ onehot(ys)``.

  Features are L2-normalised. alpha = 0 (or beta = 0 with balanced shots, where every
  class gets the same cache score) gives the zero-shot classifier exactly. gate: the
  zero-shot logits are multiplied by `support_gate` (0: the cache alone).
  """
  zs = scale * fq @ inner_lib.l2_normalize(text).T + bias
  if gate:
    zs = zs * support_gate(fs, ys, text, n_way)
  aff = jnp.exp(-beta * (1.0 - fq @ fs.T))  # (Q, S)
  cache = aff @ jax.nn.one_hot(ys, n_way, dtype=fq.dtype)  # (Q, N)
  return zs + alpha * scale * cache


FEATURE_METHODS = ("proto_zs_adapt", "tip_adapter")


def make_feature_eval(n_way: int, scale: float, bias: float, proto_weight: float, steps: int,
                      lr: float, alpha: float, beta: float, gate: bool = True,
                      cv_weights: Sequence[float] | None = None) -> Callable:
  """jitted ``f(fs, ys, fq, yq, text, ps, pq) -> {method: acc (T,)}`` over T tasks (the
  signature of `fszjax.fewshot.episodes.make_episode_eval`) for `FEATURE_METHODS`. Only
  n_way, steps, gate and cv_weights (`proto_zeroshot_adapt`) are compiled in: a grid over
  the other values reuses one program."""
  fn = _feature_eval(int(n_way), int(steps), bool(gate), _weights(cv_weights))
  hp = _hparams(scale, bias, proto_weight, lr, alpha, beta)
  return lambda fs, ys, fq, yq, text, ps, pq: {
      m: v["acc"] for m, v in fn(fs, ys, fq, yq, text, hp).items()}


def make_feature_scores(n_way: int, scale: float, bias: float, proto_weight: float, steps: int,
                        lr: float, alpha: float, beta: float, gate: bool = True,
                        cv_weights: Sequence[float] | None = None) -> Callable:
  """jitted ``f(fs, ys, fq, yq, text) -> {method: {"acc": (T,), "nll": (T,)}}``: per task the
  query accuracy and mean query log-loss of `FEATURE_METHODS` (what `select_on_val` scores)."""
  fn = _feature_eval(int(n_way), int(steps), bool(gate), _weights(cv_weights))
  hp = _hparams(scale, bias, proto_weight, lr, alpha, beta)
  return lambda fs, ys, fq, yq, text: fn(fs, ys, fq, yq, text, hp)


def _weights(cv_weights) -> tuple | None:
  return tuple(float(w) for w in cv_weights) if cv_weights else None


def _hparams(scale, bias, proto_weight, lr, alpha, beta) -> dict:
  return {k: np.float32(v) for k, v in dict(scale=scale, bias=bias, proto_weight=proto_weight,
                                            lr=lr, alpha=alpha, beta=beta).items()}


@functools.lru_cache(maxsize=None)
def _feature_eval(n_way: int, steps: int, gate: bool, cv_weights: tuple | None) -> Callable:
  def one(fs, ys, fq, yq, text, hp):
    pz = proto_zeroshot_adapt(fs, ys, fq, text, n_way, hp["scale"], hp["bias"],
                              hp["proto_weight"], steps, hp["lr"], gate, cv_weights)
    tip = tip_adapter_logits(fs, ys, fq, text, n_way, hp["scale"], hp["bias"], hp["alpha"],
                             hp["beta"], gate)
    return {m: {"acc": inner_lib.accuracy(lg, yq), "nll": inner_lib.cross_entropy(lg, yq)}
            for m, lg in (("proto_zs_adapt", pz), ("tip_adapter", tip))}

  return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, 0, None)))


# ----------------------------------------------------------------------------- towers


def lp_ft(features_fn: Callable, backbone: Any, task: dict, *, n_way: int, scale: float,
          lp_steps: int, lp_lr: float, ft_steps: int, ft_lr: float, adapt: Any) -> jax.Array:
  """LP-FT: linear probe (from zeros, on ``scale`` x frozen features), then `ft_steps` SGD
  steps of the head and the part of the tower `adapt` selects. Returns query logits."""
  xs, ys = task["support_x"], task["support_y"]
  fs = jax.lax.stop_gradient(features_fn(backbone, xs))
  zero = inner_lib.zeros_head(fs.shape[-1], n_way, fs.dtype)
  probe, _ = inner_lib.inner_loop(
      lambda h: inner_lib.cross_entropy(inner_lib.linear_head(h, fs * scale), ys), zero,
      steps=lp_steps, lr=lp_lr, first_order=True)
  head = {"w": probe["w"] * scale, "b": probe["b"]}
  return _finetune(features_fn, backbone, head, task, steps=ft_steps, lr=ft_lr, adapt=adapt)


def tower_finetune(features_fn: Callable, backbone: Any, task: dict, *, n_way: int,
                   scale: float, bias: float, proto_weight: float, steps: int, lr: float,
                   adapt: Any) -> jax.Array:
  """`proto_zeroshot_head` (from the support features and ``task['text_emb']``), then
  `steps` SGD steps of the head and the part of the tower `adapt` selects (an int k: the
  last k blocks; 'all': the whole tower). Returns query logits."""
  fs = features_fn(backbone, task["support_x"])
  head = proto_zeroshot_head(fs, task["support_y"], task["text_emb"], n_way, scale, bias,
                             proto_weight)
  return _finetune(features_fn, backbone, head, task, steps=steps, lr=lr, adapt=adapt)


def _finetune(features_fn, backbone, head, task, *, steps, lr, adapt):
  params = jax.lax.stop_gradient({"backbone": backbone, "head": head})
  mask = inner_lib.adapt_mask(params, adapt)
  xs, ys = task["support_x"], task["support_y"]
  adapted, _ = inner_lib.inner_loop(
      lambda p: inner_lib.cross_entropy(inner_lib.apply_model(features_fn, p, xs), ys),
      params, steps=steps, lr=lr, mask=mask, first_order=True)
  return inner_lib.apply_model(features_fn, adapted, task["query_x"])


# ----------------------------------------------------------------------------- validation


def cross_font_episodes(support_labels: np.ndarray, support_domains: np.ndarray,
                        query_labels: np.ndarray, query_domains: np.ndarray, *, n_way: int,
                        k_shot: int, episodes: int, seed: int) -> dict | None:
  """Episodes whose single query per class comes from one pool (e.g. ``val``) and whose k
  support examples come from another (e.g. ``train``) in fonts other than the query's.

  Returns ``{"support": (T, N*k) indices into the support pool, "support_y": (T, N*k),
  "query": (T, N) indices into the query pool, "query_y": (T, N), "classes": (T, N)}``
  (classes in the shared label space), or None when fewer than n_way classes qualify.
  """
  rng = np.random.default_rng(seed)
  by_class: dict[int, np.ndarray] = {}
  for c in np.unique(support_labels):
    by_class[int(c)] = np.nonzero(support_labels == c)[0]
  ok = [i for i, (c, d) in enumerate(zip(query_labels, query_domains))
        if int(c) in by_class and np.sum(support_domains[by_class[int(c)]] != d) >= k_shot]
  by_q: dict[int, list[int]] = {}
  for i in ok:
    by_q.setdefault(int(query_labels[i]), []).append(i)
  classes = sorted(by_q)
  if len(classes) < n_way:
    return None
  out = {k: [] for k in ("support", "support_y", "query", "query_y", "classes")}
  for _ in range(episodes):
    cls = rng.choice(classes, n_way, replace=False)
    sup, sy, qry = [], [], []
    for j, c in enumerate(cls):
      q = int(rng.choice(by_q[int(c)]))
      pool = by_class[int(c)]
      pool = pool[support_domains[pool] != query_domains[q]]
      sup.extend(rng.choice(pool, k_shot, replace=False))
      sy.extend([j] * k_shot)
      qry.append(q)
    out["support"].append(sup)
    out["support_y"].append(sy)
    out["query"].append(qry)
    out["query_y"].append(list(range(n_way)))
    out["classes"].append(cls)
  return {k: np.asarray(v) for k, v in out.items()}


def grid(spec: dict[str, Sequence]) -> list[dict]:
  """All combinations of a ``{name: values}`` grid, in order."""
  names = list(spec)
  return [dict(zip(names, vals)) for vals in itertools.product(*(spec[n] for n in names))]


def select_on_val(score: Callable[[dict], dict], candidates: list[dict], what: str) -> dict:
  """The candidate with the lowest validation log-loss: ``score(c)`` returns ``{"nll": mean
  query log-loss, "acc": query accuracy}`` (ties go to the earlier candidate). Logs the
  table; returns the candidate with ``val_nll`` and ``val_acc`` added.

  The log-loss, not the accuracy: near the accuracy ceiling (5-way tasks on Glyphs are
  99-100 % right for most candidates) accuracy ties across the grid and the choice falls to
  the grid's order, while the log-loss still ranks the candidates by how much probability
  they put on the right class."""
  if not candidates:
    raise ValueError(f"select_on_val {what}: no candidates")
  scores = []
  for cand in candidates:
    sc = {k: float(v) for k, v in score(cand).items()}
    if not np.isfinite(sc["nll"]):
      log.warning("val selection %s %s: log-loss %s, not a candidate", what, cand, sc["nll"])
      sc["nll"] = float("inf")
    log.info("val selection %s %s: log-loss %.4f, accuracy %.4f", what, cand, sc["nll"],
             sc["acc"])
    scores.append(sc)
  i = min(range(len(scores)), key=lambda j: (scores[j]["nll"], j))
  if not np.isfinite(scores[i]["nll"]):
    raise FloatingPointError(f"select_on_val {what}: every candidate's val log-loss is NaN or "
                             "infinite; check the features (NaN in the towers' outputs?)")
  log.info("val selection %s: chose %s (log-loss %.4f, accuracy %.4f)", what, candidates[i],
           scores[i]["nll"], scores[i]["acc"])
  return dict(candidates[i], val_nll=scores[i]["nll"], val_acc=scores[i]["acc"])
