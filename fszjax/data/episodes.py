"""N-way K-shot Q-query episodes (few-shot tasks) over an in-memory labeled dataset.

Input: numpy arrays ``images (N, H, W, C) float32``, ``labels (N,)`` int, optional
``domains (N,)`` int (e.g. fonts; `fszjax.data.pipeline.load_split_arrays` returns all three).

A meta-batch of T tasks is a dict::

  support_x (T, n_way * k_shot, H, W, C)   support_y (T, n_way * k_shot) int32 in 0..n_way-1
  query_x   (T, n_way * q_query, H, W, C)  query_y   (T, n_way * q_query)
  classes   (T, n_way) int32               original label ids: task label j is classes[:, j]
  [support_domain, query_domain (T,) int32 in domain modes]

Examples are grouped by class: support_y = [0]*k_shot + [1]*k_shot + ... Which original
class gets task label j is random (so a learned head cannot memorise classes).

Two samplers:

- `EpisodeSampler` (host, numpy): class-to-index tables built once; batch ``i`` of seed
  ``s`` depends only on ``(s, i)`` (random access, so resuming at step i reproduces the
  stream). Modes: ``'any'`` (ignore domains), ``'same_domain'`` (support and query from one
  domain), ``'cross_domain'`` (support from one domain, query from another), plus
  `EpisodeSampler.mldg_batch` (meta-train / meta-test domain split for MLDG) and
  `EpisodeSampler.restrict` (a sub-dataset, e.g. all domains but one).
- `sample_tasks` (device, pure and jittable) over `to_device` arrays, for datasets that fit
  in device memory: sampling happens inside the jitted training step.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fszjax.errors import UserError

MODES = ("any", "same_domain", "cross_domain")


class EpisodeError(UserError):
  """The dataset cannot provide the requested episodes; the message names the fix."""


def _group(keys: np.ndarray) -> dict[int, np.ndarray]:
  """{key: indices (sorted) where keys == key} in one argsort."""
  order = np.argsort(keys, kind="stable")
  uniq, starts = np.unique(keys[order], return_index=True)
  ends = np.append(starts[1:], len(order))
  return {int(u): order[s:e] for u, s, e in zip(uniq, starts, ends)}


class EpisodeSampler:
  """Samples meta-batches of N-way K-shot Q-query tasks; deterministic by (seed, index).

  Args:
    images: (N, H, W, C) float32 (or any array indexable by an int array).
    labels: (N,) ints.
    domains: optional (N,) ints; needed by the domain modes and `mldg_batch`.
    n_way, k_shot, q_query: task shape.
    seed: base seed.
    mode: default mode of `sample` (one of `MODES`).
  """

  def __init__(self, images: Any, labels: Any, domains: Any | None = None, *,
               n_way: int = 5, k_shot: int = 1, q_query: int = 1, seed: int = 0,
               mode: str = "any"):
    labels = np.asarray(labels)
    if labels.ndim != 1:
      raise EpisodeError(f"labels must be (N,); got shape {labels.shape}")
    if len(images) != len(labels):
      raise EpisodeError(f"images ({len(images)}) and labels ({len(labels)}) differ in length")
    if min(n_way, k_shot, q_query) < 1:
      raise EpisodeError(f"n_way={n_way}, k_shot={k_shot}, q_query={q_query} must all be >= 1")
    self.images = images
    self.labels = labels.astype(np.int64)
    self.domains = None if domains is None else np.asarray(domains).astype(np.int64)
    if self.domains is not None and self.domains.shape != labels.shape:
      raise EpisodeError(f"domains {self.domains.shape} must match labels {labels.shape}")
    self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
    self.seed = int(seed)
    self._check_mode(mode)
    self.mode = mode
    self.by_class = _group(self.labels)
    self.classes = np.array(sorted(self.by_class), np.int64)
    need = k_shot + q_query
    self.eligible = np.array([c for c in self.classes if len(self.by_class[c]) >= need], np.int64)
    self.by_domain_class: dict[int, dict[int, np.ndarray]] = {}
    self.domain_ids = np.zeros((0,), np.int64)
    if self.domains is not None:
      self.domain_ids = np.unique(self.domains)
      for d in self.domain_ids:
        idx = np.nonzero(self.domains == d)[0]
        self.by_domain_class[int(d)] = {c: idx[i] for c, i in _group(self.labels[idx]).items()}
    if mode == "any" and len(self.eligible) < n_way:
      raise EpisodeError(
          f"{n_way}-way tasks need {n_way} classes with >= {need} examples (k_shot + q_query); "
          f"only {len(self.eligible)} of {len(self.classes)} classes have that many: "
          "lower n_way, k_shot or q_query")

  # ------------------------------------------------------------------------- helpers

  def _check_mode(self, mode):
    if mode not in MODES:
      raise EpisodeError(f"mode={mode!r} is not one of {MODES}")
    if mode != "any" and self.domains is None:
      raise EpisodeError(f"mode={mode!r} needs domains (N,); pass domains= to EpisodeSampler")

  def rng(self, index: int) -> np.random.Generator:
    """The generator of batch `index` (independent of every other batch)."""
    return np.random.default_rng([self.seed, int(index)])

  def _eligible(self, table: dict[int, np.ndarray], need: int) -> np.ndarray:
    return np.array(sorted(c for c, ix in table.items() if len(ix) >= need), np.int64)

  def _pick(self, rng, pool: np.ndarray, n: int) -> np.ndarray:
    return rng.choice(pool, size=n, replace=False)

  def _task_indices(self, rng, support_tables, query_tables, classes):
    """Indices (N*K,), (N*Q,) for classes; tables map class -> example indices."""
    sup, qry = [], []
    k, q = self.k_shot, self.q_query
    for c in classes:
      if support_tables is query_tables:
        ix = self._pick(rng, support_tables[c], k + q)
        sup.append(ix[:k])
        qry.append(ix[k:])
      else:
        sup.append(self._pick(rng, support_tables[c], k))
        qry.append(self._pick(rng, query_tables[c], q))
    return np.concatenate(sup), np.concatenate(qry)

  def _domain_pairs(self, mode):
    """Per candidate (support domain, query domain): classes usable in that pairing."""
    k, q = self.k_shot, self.q_query
    pairs = []
    for ds in self.domain_ids:
      ts = self.by_domain_class[int(ds)]
      if mode == "same_domain":
        cls = self._eligible(ts, k + q)
        if len(cls) >= self.n_way:
          pairs.append((int(ds), int(ds), cls))
        continue
      cs = set(self._eligible(ts, k).tolist())
      for dq in self.domain_ids:
        if dq == ds:
          continue
        cq = set(self._eligible(self.by_domain_class[int(dq)], q).tolist())
        cls = np.array(sorted(cs & cq), np.int64)
        if len(cls) >= self.n_way:
          pairs.append((int(ds), int(dq), cls))
    if not pairs:
      raise EpisodeError(
          f"mode={mode!r}: no domain (pair) has {self.n_way} classes with enough examples "
          f"(k_shot={self.k_shot}, q_query={self.q_query}); lower n_way, k_shot or q_query")
    return pairs

  # ------------------------------------------------------------------------- sampling

  def sample(self, index: int, meta_batch: int, mode: str | None = None, *,
             support_domains: Sequence[int] | None = None,
             query_domains: Sequence[int] | None = None) -> dict:
    """Meta-batch number `index`: a dict of numpy arrays (see module doc).

    In the domain modes, `support_domains` / `query_domains` limit where support and
    query sets come from (e.g. support from source domains, query from a held-out one).
    """
    mode = self.mode if mode is None else mode
    self._check_mode(mode)
    rng = self.rng(index)
    pairs = None if mode == "any" else self._cached_pairs(mode)
    if pairs is not None and (support_domains is not None or query_domains is not None):
      pairs = [p for p in pairs
               if (support_domains is None or p[0] in set(support_domains))
               and (query_domains is None or p[1] in set(query_domains))]
      if not pairs:
        raise EpisodeError(f"mode={mode!r}: no usable (support, query) domain pair with "
                           f"support_domains={support_domains}, query_domains={query_domains}")
    elif pairs is None and (support_domains is not None or query_domains is not None):
      raise EpisodeError("support_domains / query_domains need mode='same_domain' or 'cross_domain'")
    sup, qry, classes, dsup, dqry = [], [], [], [], []
    for _ in range(meta_batch):
      if pairs is None:
        cls = self._pick(rng, self.eligible, self.n_way)
        s, q = self._task_indices(rng, self.by_class, self.by_class, cls)
        dsup.append(-1)
        dqry.append(-1)
      else:
        ds, dq, pool = pairs[rng.integers(len(pairs))]
        cls = self._pick(rng, pool, self.n_way)
        ts, tq = self.by_domain_class[ds], self.by_domain_class[dq]
        s, q = self._task_indices(rng, ts, ts if ds == dq else tq, cls)
        dsup.append(ds)
        dqry.append(dq)
      sup.append(s)
      qry.append(q)
      classes.append(cls)
    sup, qry = np.stack(sup), np.stack(qry)
    out = self._gather(sup, qry)
    out["classes"] = np.stack(classes).astype(np.int32)
    if mode != "any":
      out["support_domain"] = np.array(dsup, np.int32)
      out["query_domain"] = np.array(dqry, np.int32)
    return out

  def _cached_pairs(self, mode):
    cache = self.__dict__.setdefault("_pairs", {})
    if mode not in cache:
      cache[mode] = self._domain_pairs(mode)
    return cache[mode]

  def _gather(self, sup: np.ndarray, qry: np.ndarray) -> dict:
    t = sup.shape[0]
    imgs = np.asarray(self.images[np.concatenate([sup.ravel(), qry.ravel()])])
    ns = sup.size
    return {
        "support_x": imgs[:ns].reshape((t, sup.shape[1]) + imgs.shape[1:]),
        "support_y": np.tile(np.repeat(np.arange(self.n_way), self.k_shot), (t, 1)).astype(np.int32),
        "query_x": imgs[ns:].reshape((t, qry.shape[1]) + imgs.shape[1:]),
        "query_y": np.tile(np.repeat(np.arange(self.n_way), self.q_query), (t, 1)).astype(np.int32),
        "support_index": sup.astype(np.int64),
        "query_index": qry.astype(np.int64),
    }

  def __iter__(self):
    raise TypeError("use sampler.batches(meta_batch, start=0) to iterate")

  def batches(self, meta_batch: int, start: int = 0, mode: str | None = None):
    """Endless iterator of `sample(i, meta_batch, mode)` for i = start, start + 1, ..."""
    i = start
    while True:
      yield self.sample(i, meta_batch, mode)
      i += 1

  # ------------------------------------------------------------------------- domains

  def restrict(self, *, domains: Sequence[int] | None = None,
               classes: Sequence[int] | None = None, seed: int | None = None) -> "EpisodeSampler":
    """A sampler over the examples whose domain is in `domains` and class in `classes`."""
    keep = np.ones(len(self.labels), bool)
    if domains is not None:
      if self.domains is None:
        raise EpisodeError("restrict(domains=...) needs a sampler built with domains")
      keep &= np.isin(self.domains, np.asarray(domains))
    if classes is not None:
      keep &= np.isin(self.labels, np.asarray(classes))
    idx = np.nonzero(keep)[0]
    if len(idx) == 0:
      raise EpisodeError(f"restrict(domains={domains}, classes={classes}) keeps no examples")
    return EpisodeSampler(
        _Indexed(self.images, idx), self.labels[idx],
        None if self.domains is None else self.domains[idx], n_way=self.n_way,
        k_shot=self.k_shot, q_query=self.q_query, seed=self.seed if seed is None else seed,
        mode=self.mode)

  def mldg_split(self, index: int, n_meta_test: int = 1,
                 source_domains: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Random (meta-train domains, meta-test domains) split of the source domains for batch `index`."""
    if self.domains is None:
      raise EpisodeError("MLDG needs domains (N,); pass domains= to EpisodeSampler")
    src = np.asarray(self.domain_ids if source_domains is None else source_domains, np.int64)
    if not 1 <= n_meta_test < len(src):
      raise EpisodeError(f"n_meta_test={n_meta_test} must be in [1, {len(src) - 1}] for "
                         f"{len(src)} source domains")
    perm = np.random.default_rng([self.seed, int(index), 1]).permutation(src)
    return np.sort(perm[n_meta_test:]), np.sort(perm[:n_meta_test])

  def mldg_batch(self, index: int, batch_size: int, n_meta_test: int = 1,
                 source_domains: Sequence[int] | None = None) -> dict:
    """MLDG batch `index`: ``{'train': {x, y, domain}, 'test': {x, y, domain}}``.

    Source domains are split at random into meta-train and meta-test domains
    (`mldg_split`); each side draws `batch_size` examples uniformly from its domains.
    ``y`` is the class's position in ``self.classes`` (a fixed label space 0..C-1).
    """
    train_d, test_d = self.mldg_split(index, n_meta_test, source_domains)
    rng = self.rng(index)
    out = {}
    for name, doms in (("train", train_d), ("test", test_d)):
      pool = np.nonzero(np.isin(self.domains, doms))[0]
      idx = rng.choice(pool, size=batch_size, replace=len(pool) < batch_size)
      out[name] = {"x": np.asarray(self.images[idx]),
                   "y": np.searchsorted(self.classes, self.labels[idx]).astype(np.int32),
                   "domain": self.domains[idx].astype(np.int32)}
    return out


class _Indexed:
  """A lazy view ``base[idx]`` that supports ``len`` and integer-array indexing."""

  def __init__(self, base, idx):
    self.base, self.idx = base, np.asarray(idx)

  def __len__(self):
    return len(self.idx)

  def __getitem__(self, i):
    return self.base[self.idx[i]]


# ----------------------------------------------------------------------------- device


def to_device(images: Any, labels: Any, *, min_count: int = 1) -> dict:
  """Device arrays for `sample_tasks`.

  Returns ``{'images': (N, H, W, C), 'table': (C, M) int32 example indices of each class
  (padded with 0), 'counts': (C,) int32, 'class_ids': (C,) int32 original labels}``; M is
  the largest class size. Classes with fewer than `min_count` examples are dropped.
  """
  labels = np.asarray(labels).astype(np.int64)
  groups = {c: ix for c, ix in _group(labels).items() if len(ix) >= min_count}
  if not groups:
    raise EpisodeError(f"no class has >= {min_count} examples")
  cls = sorted(groups)
  m = max(len(groups[c]) for c in cls)
  table = np.zeros((len(cls), m), np.int32)
  counts = np.zeros((len(cls),), np.int32)
  for i, c in enumerate(cls):
    table[i, :len(groups[c])] = groups[c]
    counts[i] = len(groups[c])
  return {"images": jnp.asarray(images), "table": jnp.asarray(table),
          "counts": jnp.asarray(counts), "class_ids": jnp.asarray(np.array(cls, np.int32))}


def sample_tasks(key, device_data: dict, n_way: int, k_shot: int, q_query: int,
                 meta_batch: int) -> dict:
  """Samples T = meta_batch tasks on device; pure and jittable (n_way, k_shot, ... static).

  Classes with fewer than k_shot + q_query examples are never drawn. Classes of a task are
  distinct, and so are the examples of a class within a task.
  Returns the dict of the module doc (jax arrays), without domain fields.
  """
  table, counts = device_data["table"], device_data["counts"]
  need = k_shot + q_query
  if need > table.shape[1]:
    raise EpisodeError(f"k_shot + q_query = {need} exceeds the largest class ({table.shape[1]})")
  eligible = counts >= need

  def one(k):
    kc, ke = jax.random.split(k)
    # n_way distinct eligible classes: top-n of uniform noise, ineligible ones at -inf.
    score = jnp.where(eligible, jax.random.uniform(kc, counts.shape), -jnp.inf)
    _, cls = jax.lax.top_k(score, n_way)  # (N,) rows of table
    # For each class, k+q distinct examples among its counts[c] entries.
    u = jax.random.uniform(ke, (n_way, table.shape[1]))
    u = jnp.where(jnp.arange(table.shape[1])[None, :] < counts[cls][:, None], u, -jnp.inf)
    _, pos = jax.lax.top_k(u, need)  # (N, K+Q)
    idx = jnp.take_along_axis(table[cls], pos, axis=1)
    return idx[:, :k_shot].reshape(-1), idx[:, k_shot:].reshape(-1), cls

  sup, qry, cls = jax.vmap(one)(jax.random.split(key, meta_batch))
  images = device_data["images"]
  t = meta_batch
  return {
      "support_x": images[sup],
      "support_y": jnp.tile(jnp.repeat(jnp.arange(n_way, dtype=jnp.int32), k_shot), (t, 1)),
      "query_x": images[qry],
      "query_y": jnp.tile(jnp.repeat(jnp.arange(n_way, dtype=jnp.int32), q_query), (t, 1)),
      "classes": device_data["class_ids"][cls],
  }
