"""Input-pipeline throughput (examples/s) on the default Glyphs config.

    python benchmarks/bench_pipeline.py --data_dir /tmp/fszjax_data [--batch 256] \
        [--batches 40] [--num_threads 2] [--num_workers 0]

Prepares Glyphs into --data_dir first if needed. Reports one JSON line: examples/s of
`make_train_iterator` (decode + affine augmentation + tokenization + batching), after
warm-up batches, plus the same for `load_split_arrays` (decode only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data_dir", default=os.environ.get("TFDS_DATA_DIR", "/tmp/fszjax_data"))
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--batches", type=int, default=40)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--num_threads", type=int, default=None)
  p.add_argument("--num_workers", type=int, default=None)
  args = p.parse_args(argv)

  from fszjax.data import arrays, defaults, glyphs, pipeline, vocab

  t = time.time()
  glyphs.prepare(glyphs.GlyphsOptions(), args.data_dir)
  prepare_s = time.time() - t
  cfg = defaults.glyphs_data_config()
  cfg.data_dir = args.data_dir
  if args.num_threads is not None:
    cfg.num_threads = args.num_threads
  if args.num_workers is not None:
    cfg.num_workers = args.num_workers
  vocab.get_tokenizer(cfg)  # trains + caches once
  it = pipeline.make_train_iterator(cfg, global_batch=args.batch, seed=0, process_index=0, process_count=1)
  for _ in range(args.warmup):
    next(it)
  t = time.time()
  for _ in range(args.batches):
    next(it)
  train_s = time.time() - t
  it.close()
  t = time.time()
  split_arrays = arrays.load_split_arrays(cfg, "test_fonts")
  eval_s = time.time() - t
  result = {
      "bench": "pipeline", "config": "glyphs (32x32x1, affine aug, L=16)",
      "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
      "num_threads": cfg.num_threads, "num_workers": cfg.num_workers, "batch": args.batch,
      "train_examples_per_s": round(args.batch * args.batches / train_s, 1),
      "eval_examples_per_s": round(len(split_arrays["label"]) / eval_s, 1),
      "prepare_or_check_s": round(prepare_s, 2),
  }
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
