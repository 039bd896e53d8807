"""MAML meta-training throughput: fszjax formulations vs. a per-task loop vs. learn2learn.

One run, one machine, so the ratios are meaningful (absolute CPU numbers are not):

1. `fszjax.fewshot.bench.bench_adapt` for each Conv-4 formulation (meta-batch vmapped in
   task chunks, jitted, one step = one meta-update of `meta_batch` tasks);
2. the same computation as a plain per-task loop: one jitted single-task meta-gradient
   called for each task from Python, gradients summed, then the optimizer step;
3. learn2learn's second-order MAML (the peers venv, if built with
   ``bash /work/shared/peers/setup_peers.sh /tmp/fszjax-peers``), run from ``/``.

Workload (learn2learn's Omniglot example): Conv-4 with per-task batch norm, 5-way 1-shot,
1 query per class, `--inner_steps` (5) inner steps, meta-batch 32, 28x28x1 random images.

Usage: python benchmarks/bench_maml.py [--inner_steps 5] [--steps 5]
         [--formulations im2col,patches,s2d,conv] [--task_chunk -1] [--peer_python PATH]
Prints one JSON line per measurement and a final JSON summary line with the ratios.
For the interleaved same-setting comparison with learn2learn (best of its thread
settings, load recorded) use ``benchmarks/peers.py --only maml``.
"""

import argparse
import json
import os
import subprocess
import sys


def run_peer(python: str, inner_steps: int, timeout: float) -> dict | None:
  script = "/work/shared/peers/l2l_maml_bench.py"
  if not (os.path.exists(python) and os.path.exists(script)):
    print(json.dumps({"peer": "learn2learn", "skipped": f"{python} or {script} missing"}))
    return None
  try:
    out = subprocess.run([python, script, str(inner_steps)], cwd="/", capture_output=True,
                         text=True, check=False, timeout=timeout)
  except subprocess.TimeoutExpired:
    print(json.dumps({"peer": "learn2learn", "error": f"timed out after {timeout} s"}))
    return None
  for line in out.stdout.splitlines():
    if line.startswith("{"):
      return json.loads(line)
  print(json.dumps({"peer": "learn2learn", "error": out.stderr[-500:]}))
  return None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--inner_steps", type=int, default=5)
  p.add_argument("--meta_batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=5, help="timed meta-steps per measurement")
  p.add_argument("--formulations", default="im2col,patches,s2d,conv")
  p.add_argument("--task_chunk", type=int, default=-1, help="-1: auto (4 on CPU)")
  p.add_argument("--remat", type=int, default=1)
  p.add_argument("--algorithm", default="maml")
  p.add_argument("--peer_python", default="/tmp/fszjax-peers/bin/python")
  p.add_argument("--no_peer", action="store_true")
  p.add_argument("--peer_timeout", type=float, default=300)
  p.add_argument("--no_loop", action="store_true")
  p.add_argument("--cpu_devices", type=int, default=os.cpu_count() or 1,
                 help="CPU devices to also time the meta-batch sharded over (1: skip)")
  args = p.parse_args(argv)

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  import jax

  if args.cpu_devices > 1:  # only affects the CPU backend; must precede its start
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  from fszjax.fewshot import bench

  common = dict(algorithm=args.algorithm, inner_steps=args.inner_steps,
                meta_batch=args.meta_batch, task_chunk=args.task_chunk,
                remat=bool(args.remat), devices=1)
  results = {}
  for form in [f for f in args.formulations.split(",") if f]:
    # The vmapped grouped convolution is slow on CPU: time it briefly.
    steps = 2 if form == "conv" else args.steps
    r = bench.bench_adapt(formulation=form, steps=steps, warmup=0 if form == "conv" else 1,
                          **common)
    print(json.dumps(r), flush=True)
    results[form] = r["tasks_per_sec"]
  summary = {"workload": f"{args.algorithm} conv4 5-way 1-shot, {args.inner_steps} inner steps, "
                         f"meta-batch {args.meta_batch}", "fszjax": results}
  best = max(results, key=results.get) if results else None
  if best:
    summary["fszjax_best"] = {"formulation": best, "devices": 1, "tasks_per_sec": results[best]}
  ndev = jax.device_count()
  if best and ndev > 1 and args.meta_batch % ndev == 0:
    r = bench.bench_adapt(formulation=best, steps=args.steps, **dict(common, devices=ndev))
    print(json.dumps(r), flush=True)
    summary[f"fszjax_{best}_{ndev}_devices"] = r["tasks_per_sec"]
    if r["tasks_per_sec"] > results[best]:
      summary["fszjax_best"] = {"formulation": best, "devices": ndev,
                                "tasks_per_sec": r["tasks_per_sec"]}
  if not args.no_loop:
    r = bench.bench_adapt(formulation=best or "im2col", strategy="task_loop",
                          steps=max(2, args.steps // 2), **common)
    print(json.dumps(r), flush=True)
    summary["per_task_loop"] = r["tasks_per_sec"]
    if best:
      summary["ratio_vs_per_task_loop"] = round(
          summary["fszjax_best"]["tasks_per_sec"] / r["tasks_per_sec"], 2)
  if not args.no_peer:
    peer = run_peer(args.peer_python, args.inner_steps, args.peer_timeout)
    if peer:
      print(json.dumps(peer), flush=True)
      summary["learn2learn"] = peer["tasks_per_sec"]
      # Same setting only: one device (learn2learn runs one process), learn2learn's workload.
      if best and args.meta_batch == 32 and args.algorithm == "maml":
        summary["ratio_vs_learn2learn_1_device"] = round(
            results[best] / peer["tasks_per_sec"], 2)
      else:
        summary["ratio_vs_learn2learn"] = "not printed: the settings differ from learn2learn's"
  summary["load_avg_1m"] = round(os.getloadavg()[0], 2)
  print(json.dumps(summary), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
