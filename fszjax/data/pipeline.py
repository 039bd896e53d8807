"""Grain input pipelines over TFDS ArrayRecord data (TF-free reading: PIL decodes).

One pipeline per JAX process:

  tfds.data_source (random access) -> global shuffle (seeded, reshuffled every epoch)
  -> repeat -> per-example decode + augment + tokenize (seeded by the global index)
  -> [mix several datasets with weights] -> shard by process (index p, p+P, p+2P, ...)
  -> threads (or worker processes) -> batches of b = global_batch / P, drop_remainder

Each batch is a dict of numpy arrays: `image` float32 (b, H, W, C), `tokens` int32
(b, L), `label` int32 (b,). The iterator is a grain `DatasetIterator`: `get_state()` /
`set_state()` give exact resume, and it works with `grain.checkpoint.CheckpointSave /
CheckpointRestore` as an Orbax checkpoint item. Undecodable images are skipped and
counted (`iterator.num_skipped`).

Entry points: `make_train_iterator`, `make_train_dataset`. Datasets are found by
`fszjax.data.sources`, examples decoded by `fszjax.data.preprocess`, the tokenizer comes
from `fszjax.data.vocab`; whole splits as arrays: `fszjax.data.arrays`.
"""


from __future__ import annotations

import hashlib
import json

import jax
import numpy as np
from absl import flags

from fszjax.data.errors import DataError
from fszjax.data.preprocess import SKIP, ExampleProcessor, SkipCounter
from fszjax.data.sources import components, open_split
from fszjax.data.vocab import get_tokenizer

try:
  import grain
  _IterBase, _DatasetBase = grain.DatasetIterator, grain.IterDataset
except ModuleNotFoundError:  # grain is optional where only `fszjax bench` runs (synthetic data)
  grain = None
  _IterBase = _DatasetBase = object


def _batch_items(items: list[dict]) -> dict[str, np.ndarray]:
  return {k: np.stack([it[k] for it in items]) for k in items[0]}


class _CountingBatchIterator(_IterBase):
  """Batches elements, dropping skip markers and reporting how many in `_skipped`."""

  def __init__(self, parent_it, batch_size: int, drop_remainder: bool):
    super().__init__(parent_it)
    self._batch_size = batch_size
    self._drop_remainder = drop_remainder

  def __next__(self):
    items, skipped = [], 0
    while len(items) < self._batch_size:
      try:
        x = next(self._parent)
      except StopIteration:
        if items and not self._drop_remainder:
          break
        raise
      if SKIP in x:
        skipped += 1
        continue
      items.append(x)
    batch = _batch_items(items)
    batch["_skipped"] = np.int32(skipped)
    return batch

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class CountingBatchDataset(_DatasetBase):
  """`IterDataset` of batches (dicts of stacked arrays) that skips undecodable examples.

  Each batch carries `_skipped`: how many examples were dropped while filling it.
  """

  def __init__(self, parent, batch_size: int, drop_remainder: bool = True):
    super().__init__(parent)
    self._batch_size = int(batch_size)
    self._drop_remainder = bool(drop_remainder)

  def __iter__(self):
    return _CountingBatchIterator(self._parent.__iter__(), self._batch_size, self._drop_remainder)

  def __str__(self):
    return f"CountingBatchDataset(batch_size={self._batch_size}, drop_remainder={self._drop_remainder})"


class TrainIterator(_IterBase):
  """Infinite iterator of numpy batches with exact, checkpointable state.

  `num_skipped` counts undecodable images skipped so far (part of the state).
  """

  def __init__(self, parent_it, batch_size: int):
    super().__init__(parent_it)
    self.num_skipped = 0
    self.batch_size = batch_size

  def __next__(self):
    batch = next(self._parent)
    self.num_skipped += int(batch.pop("_skipped"))
    return batch

  def get_state(self):
    return {"pipeline": self._parent.get_state(), "num_skipped": int(self.num_skipped)}

  def set_state(self, state):
    self._parent.set_state(state["pipeline"])
    self.num_skipped = int(state.get("num_skipped", 0))


def _seed32(*parts) -> int:
  h = hashlib.sha256(json.dumps(parts).encode()).digest()
  return int.from_bytes(h[:4], "little")


def _process_info(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= int(process_index) < int(process_count):
    raise DataError(f"process_index={process_index} must be in [0, process_count={process_count})")
  return int(process_index), int(process_count)


def make_train_dataset(data_cfg, *, global_batch: int, seed: int, process_index: int | None = None,
                       process_count: int | None = None, tokenizer=None):
  """The grain `IterDataset` behind `make_train_iterator` (batches carry a `_skipped` count)."""
  if grain is None:
    raise DataError("training needs the grain package: pip install grain")
  pi, pc = _process_info(process_index, process_count)
  if global_batch % pc:
    raise DataError(f"global batch {global_batch} is not divisible by {pc} processes; use a multiple of {pc}")
  per_process = global_batch // pc
  comps = components(data_cfg)
  tok = tokenizer if tokenizer is not None else get_tokenizer(data_cfg)
  parts, weights = [], []
  for i, (c, w) in enumerate(comps):
    opened = open_split(c, c["train_split"])
    if len(opened.source) == 0:
      raise DataError(f"{c['name']} split {c['train_split']!r} is empty; choose another data.train_split")
    proc = ExampleProcessor(c, opened.class_names, tok, train=True, counter=SkipCounter())
    ds = grain.MapDataset.source(opened.source)
    if c.get("shuffle", True):
      ds = ds.shuffle(seed=_seed32("shuffle", seed, i))
    ds = ds.repeat(None)
    ds = ds.random_map(proc, seed=_seed32("augment", seed, i))
    parts.append(ds)
    weights.append(w)
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  ds = ds[pi::pc]
  cfg0 = comps[0][0]
  read = grain.ReadOptions(num_threads=int(cfg0.get("num_threads") or 0),
                           prefetch_buffer_size=int(cfg0.get("prefetch_buffer_size") or 16))
  it_ds = ds.to_iter_dataset(read)
  it_ds = CountingBatchDataset(it_ds, per_process, drop_remainder=True)
  workers = int(cfg0.get("num_workers") or 0)
  if workers > 0:  # grain's worker processes read absl flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=int(cfg0.get("worker_buffer_size") or 2)))
  return it_ds, per_process


def make_train_iterator(data_cfg, *, global_batch: int, seed: int, process_index: int | None = None,
                        process_count: int | None = None):
  """Infinite iterator of this process's training batches.

  Yields dicts of numpy arrays: image float32 (b, H, W, C), tokens int32 (b, L),
  label int32 (b,), with b = global_batch / process_count. Epochs repeat with new
  shuffles; same seed -> same batches. `get_state()`/`set_state()` resume exactly and the
  iterator is a grain `DatasetIterator`, so `grain.checkpoint.CheckpointSave(it)` /
  `CheckpointRestore(it)` save it in an Orbax checkpoint. `num_skipped` counts
  undecodable images.
  """
  it_ds, per_process = make_train_dataset(data_cfg, global_batch=global_batch, seed=seed,
                                          process_index=process_index, process_count=process_count)
  return TrainIterator(iter(it_ds), per_process)
