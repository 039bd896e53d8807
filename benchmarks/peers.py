"""fszjax against its peers on the same work, in one run: open_clip and learn2learn.

    python benchmarks/peers.py                       # everything, about 6-9 min on 2 cores
    python benchmarks/peers.py --only train --rounds 5

Workloads (the same on both sides; each side reports the settings it actually ran, and
no ratio is printed when they differ):

  train   contrastive train step: open_clip's CLIP architecture at width 256 / depth 4 in
          both towers (4 heads), 64 px images, patch 16, 32 tokens, vocabulary 49408,
          embedding 256 (19.3M parameters), batch 64, fp32, CLIP softmax loss, AdamW
          (lr 5e-4, betas 0.9/0.98, eps 1e-6, wd 0.2, no clipping), one device / process.
          open_clip: ``open_clip.CLIP`` + ``ClipLoss`` + ``torch.optim.AdamW`` as its
          trainer sets them up. Unit: examples/s.
  encode  ``encode_image`` of ViT-B-32 (random init, no download) at batch 32, 224 px,
          fp32. fszjax runs the open_clip model's own weights through
          `fszjax.convert.open_clip` and checks its embeddings against open_clip's.
          Unit: images/s.
  maml    second-order MAML, Conv-4 (64 channels, batch norm), 5-way 1-shot, 1 query, 5
          inner steps (lr 0.4), meta-batch 32, 28x28x1, Adam 1e-3: learn2learn's Omniglot
          example against ``fszjax bench adapt``'s default. Unit: tasks/s.

Each measurement is a fresh subprocess (the peer venv's Python for the peers, this
repository's for fszjax); rounds interleave them A B A B, PyTorch at each of
``--threads`` (its best setting is the one compared). Per round and side: the median over
the timed steps; reported: the median over rounds, the load average before and after, the
cores used (CPU time / wall time) and the ratio fszjax / best peer.

The peers' venv: ``bash /work/shared/peers/setup_peers.sh /tmp/fszjax-peers``.
This file runs under both Pythons: its top level imports only the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The train workload, as an open_clip model config (fszjax builds the same architecture
# from it with `fszjax.convert.open_clip.fszjax_model_config`).
TRAIN_OC_CFG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}
TRAIN = {"batch": 64}
ADAMW = {"lr": 5e-4, "b1": 0.9, "b2": 0.98, "eps": 1e-6, "wd": 0.2}
ENCODE = {"model": "ViT-B-32", "batch": 32, "image_size": 224}
MAML = {"algorithm": "maml", "first_order": False, "n_way": 5, "k_shot": 1, "q_query": 1,
        "inner_steps": 5, "inner_lr": 0.4, "meta_batch": 32, "image_size": 28, "channels": 1,
        "hidden": 64, "layers": 4, "norm": "batch", "outer_lr": 1e-3}
UNITS = {"train": "examples/s", "encode": "images/s", "maml": "tasks/s"}
WORKLOADS = ("train", "encode", "maml")


def _cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _timed(fn, steps: int, warmup: int) -> dict:
  """Runs `fn` (which blocks until its result is ready) warmup + steps times."""
  t0 = time.perf_counter()
  for _ in range(warmup):
    fn()
  first = time.perf_counter() - t0
  times, cpu0, wall0 = [], _cpu_s(), time.perf_counter()
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  cores = (_cpu_s() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
  return {"step_s": statistics.median(times), "warmup_s": round(first, 2), "cores": round(cores, 2)}


# ----------------------------------------------------------------------------- peer workers


def _torch_threads(threads: int):
  import torch

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  return torch


def _random_tokens(rng, batch: int, length: int, vocab: int):
  import numpy as np

  tokens = rng.integers(1, vocab - 1, size=(batch, length)).astype(np.int64)
  for i, n in enumerate(rng.integers(1, length - 1, size=batch)):
    tokens[i, n] = vocab - 1  # end of text: the highest id
    tokens[i, n + 1:] = 0
  return tokens


def peer_train(threads: int, steps: int, warmup: int) -> dict:
  import numpy as np
  import open_clip

  torch = _torch_threads(threads)
  model = open_clip.CLIP(**TRAIN_OC_CFG, output_dict=True)
  model.train()
  # open_clip's trainer: no weight decay on gains, biases, logit_scale (ndim < 2).
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "bn" not in n and "ln" not in n]
  no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "bn" not in n and "ln" not in n)]
  opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                           {"params": decay, "weight_decay": ADAMW["wd"]}],
                          lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]), eps=ADAMW["eps"])
  loss_fn = open_clip.ClipLoss()
  rng = np.random.default_rng(0)
  b, v, t = TRAIN["batch"], TRAIN_OC_CFG["vision_cfg"], TRAIN_OC_CFG["text_cfg"]
  batches = [(torch.from_numpy(rng.normal(size=(b, 3, v["image_size"], v["image_size"])).astype(np.float32)),
              torch.from_numpy(_random_tokens(rng, b, t["context_length"], t["vocab_size"])))
             for _ in range(4)]
  i = [0]

  def step():
    images, tokens = batches[i[0] % 4]
    i[0] += 1
    opt.zero_grad(set_to_none=True)
    out = model(images, tokens)
    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    opt.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, np.log(100))
    return loss.item()

  r = _timed(step, steps, warmup)
  r["settings"] = {"arch": TRAIN_OC_CFG, "params": sum(p.numel() for p in model.parameters()),
                   "batch": b, "dtype": "float32", "loss": "clip", "optimizer": "adamw",
                   "optimizer_args": ADAMW, "clip_norm": None, "devices": 1}
  r["config"] = f"torch {torch.__version__}, {threads} thread(s)"
  return r


def peer_encode(threads: int, steps: int, warmup: int, weights: str | None) -> dict:
  import numpy as np
  import open_clip

  torch = _torch_threads(threads)
  model = open_clip.create_model(ENCODE["model"], pretrained=None)
  model.eval()
  if weights:  # written once for fszjax to convert; every round then runs the same weights
    from safetensors.torch import save_file

    save_file({k: t.contiguous() for k, t in model.state_dict().items()}, weights)
  rng = np.random.default_rng(0)
  s, b = ENCODE["image_size"], ENCODE["batch"]
  images = rng.normal(size=(b, s, s, 3)).astype(np.float32)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  out = {}

  def step():
    with torch.no_grad():
      out["z"] = model.encode_image(x, normalize=True)

  r = _timed(step, steps, warmup)
  r["embedding_head"] = out["z"][:4].numpy().round(6).tolist()
  r["settings"] = {"model": ENCODE["model"], "params": sum(p.numel() for p in model.visual.parameters()),
                   "batch": b, "image_size": s, "dtype": "float32", "normalize": True}
  r["config"] = f"torch {torch.__version__}, {threads} thread(s)"
  return r


def peer_maml(threads: int, steps: int, warmup: int) -> dict:
  import learn2learn as l2l

  torch = _torch_threads(threads)
  m = MAML
  model = l2l.vision.models.OmniglotCNN(output_size=m["n_way"], hidden_size=m["hidden"],
                                        layers=m["layers"])
  maml = l2l.algorithms.MAML(model, lr=m["inner_lr"], first_order=m["first_order"])
  opt = torch.optim.Adam(maml.parameters(), m["outer_lr"])
  loss_fn = torch.nn.CrossEntropyLoss()
  t, n, s = m["meta_batch"], m["n_way"], m["image_size"]
  xs = torch.randn(t, n * m["k_shot"], m["channels"], s, s)
  ys = torch.arange(n).repeat_interleave(m["k_shot"])
  xq = torch.randn(t, n * m["q_query"], m["channels"], s, s)
  yq = torch.arange(n).repeat_interleave(m["q_query"])

  def step():
    opt.zero_grad()
    for i in range(t):
      learner = maml.clone()
      for _ in range(m["inner_steps"]):
        learner.adapt(loss_fn(learner(xs[i]), ys))
      (loss_fn(learner(xq[i]), yq) / t).backward()
    opt.step()

  r = _timed(step, steps, warmup)
  norm = "batch" if any(isinstance(x, torch.nn.BatchNorm2d) for x in model.modules()) else "?"
  r["settings"] = dict(m, norm=norm, devices=1)
  r["config"] = f"learn2learn {l2l.__version__}, torch {torch.__version__}, {threads} thread(s)"
  return r


# ----------------------------------------------------------------------------- fszjax workers


def _fszjax_env():
  sys.path.insert(0, REPO)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  # Later rounds load the compiled programs instead of compiling again.
  jax.config.update("jax_compilation_cache_dir",
                    os.environ.get("FSZJAX_PEERS_CACHE", os.path.join(tempfile.gettempdir(),
                                                                       "fszjax-peers-jax-cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return jax


def fszjax_train(steps: int, warmup: int) -> dict:
  jax = _fszjax_env()
  from fszjax import bench, pretrain, sharding
  from fszjax.convert import common as conv_common
  from fszjax.convert import open_clip as oc

  cfg = conv_common.base_config()
  cfg.model = oc.fszjax_model_config(TRAIN_OC_CFG)
  cfg.loss, cfg.batch_size, cfg.grad_accum = "clip", TRAIN["batch"], 1
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
  cfg.optim.update(dict(**ADAMW, clip_norm=0.0, warmup_steps=0, schedule="constant",
                        freeze=[]))
  mesh = sharding.mesh_from_config(cfg.mesh, devices=jax.devices()[:1])
  rules = sharding.rules_from_config(cfg)
  state, model, tx, schedule = pretrain.create_train_state(cfg, mesh, rules)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  step_fn = pretrain.make_train_step(model, tx, schedule, cfg, mesh, rules,
                                     state_shardings=sharding.shardings_of(state))
  batches = [sharding.host_to_global(b, mesh)
             for b in bench.synthetic_batches(cfg, cfg.batch_size, 0)]
  box, i = [state], [0]

  def step():
    box[0], metrics = step_fn(box[0], batches[i[0] % 4])
    i[0] += 1
    return float(metrics["loss"])

  r = _timed(step, steps, warmup)
  r["settings"] = {"arch": TRAIN_OC_CFG, "params": int(n_params), "batch": cfg.batch_size,
                   "dtype": cfg.model.dtype, "loss": cfg.loss, "optimizer": "adamw",
                   "optimizer_args": {k: cfg.optim[k] for k in ADAMW}, "clip_norm": None,
                   "devices": int(mesh.devices.size)}
  r["config"] = f"jax {jax.__version__}, {jax.devices()[0].device_kind}"
  return r


def fszjax_encode(steps: int, warmup: int, weights: str, reference: list | None) -> dict:
  jax = _fszjax_env()
  import jax.numpy as jnp
  import numpy as np

  from fszjax.convert import common as conv_common
  from fszjax.convert import open_clip as oc
  from fszjax.models.two_tower import TwoTower, build_model

  name, oc_cfg = oc.model_config(ENCODE["model"])
  cfg = conv_common.base_config()
  cfg.model = oc.fszjax_model_config(oc_cfg, name)
  flat = oc.import_state_dict(conv_common.read_weights(weights), oc_cfg, name)
  flat = conv_common.fit_to_model(flat, cfg, f"open_clip {name}")
  params = jax.device_put(conv_common.unflatten(flat))
  model = build_model(cfg.model)
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=TwoTower.encode_image))
  rng = np.random.default_rng(0)
  s, b = ENCODE["image_size"], ENCODE["batch"]
  images = jnp.asarray(rng.normal(size=(b, s, s, 3)).astype(np.float32))
  out = {}

  def step():
    out["z"] = jax.block_until_ready(encode(params, images))

  r = _timed(step, steps, warmup)
  if reference is not None:
    r["max_abs_diff_vs_peer"] = float(np.max(np.abs(np.asarray(out["z"][:4]) - np.asarray(reference))))
  n_img = sum(int(np.prod(v.shape)) for k, v in flat.items() if k.startswith("img/"))
  r["settings"] = {"model": ENCODE["model"], "params": n_img, "batch": b, "image_size": s,
                   "dtype": cfg.model.dtype, "normalize": True}
  r["config"] = f"jax {jax.__version__}, {jax.devices()[0].device_kind}"
  return r


def fszjax_maml(steps: int, warmup: int) -> dict:
  jax = _fszjax_env()
  from fszjax.fewshot import bench as fbench

  r = fbench.bench_adapt(devices=1, steps=steps, warmup=warmup)
  s = fbench.resolve_settings(devices=1)
  settings = {k: s[k] for k in MAML}
  settings["devices"] = r["devices"]
  return {"step_s": r["step_time_s"], "warmup_s": r["compile_s"], "settings": settings,
          "config": f"jax {jax.__version__}, formulation {r['formulation']}, "
                    f"task chunk {r['task_chunk']}"}


# ----------------------------------------------------------------------------- driver


def _worker(args) -> int:
  side, work = args.worker.split(":")
  threads = int(args.threads)
  if side == "peer":
    if work == "train":
      r = peer_train(threads, args.steps, args.warmup)
    elif work == "encode":
      r = peer_encode(threads, args.steps, args.warmup, args.weights or None)
    else:
      r = peer_maml(threads, args.steps, args.warmup)
  else:
    if work == "train":
      r = fszjax_train(args.steps, args.warmup)
    elif work == "encode":
      ref = json.loads(args.reference) if args.reference else None
      r = fszjax_encode(args.steps, args.warmup, args.weights, ref)
    else:
      r = fszjax_maml(args.steps, args.warmup)
  r["cores_measured"] = r.pop("cores", None)
  print("RESULT " + json.dumps(r), flush=True)
  return 0


def _run(python: str, worker: str, steps: int, warmup: int, timeout: float, *, threads: int = 0,
         weights: str = "", reference=None, cwd: str = REPO) -> dict:
  cmd = [python, os.path.abspath(__file__), "--worker", worker, "--steps", str(steps),
         "--warmup", str(warmup), "--threads", str(threads), "--weights", weights]
  if reference is not None:
    cmd += ["--reference", json.dumps(reference)]
  load0 = os.getloadavg()[0]
  try:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"{worker} timed out after {timeout:.0f} s"}
  for line in p.stdout.splitlines():
    if line.startswith("RESULT "):
      r = json.loads(line[len("RESULT "):])
      r["load_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
      return r
  return {"error": f"{worker} failed (exit {p.returncode}): {(p.stderr or p.stdout)[-800:]}"}


STEPS = {"train": (5, 2), "encode": (3, 1), "maml": (4, 1)}  # (timed, warmup) per run


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", default=",".join(WORKLOADS), help="comma list of " + ", ".join(WORKLOADS))
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--threads", default="1,2", help="PyTorch thread settings tried for each peer")
  p.add_argument("--peer_python", default="/tmp/fszjax-peers/bin/python")
  p.add_argument("--timeout", type=float, default=300, help="seconds per measurement")
  p.add_argument("--json", default="", help="also write all measurements to this file")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
  p.add_argument("--weights", default="", help=argparse.SUPPRESS)
  p.add_argument("--reference", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    return _worker(args)

  works = [w for w in args.only.split(",") if w]
  bad = [w for w in works if w not in WORKLOADS]
  if bad:
    p.error(f"unknown workload {bad[0]!r}; use {', '.join(WORKLOADS)}")
  if not os.path.exists(args.peer_python):
    p.error(f"no peer Python at {args.peer_python}: run "
            f"'bash /work/shared/peers/setup_peers.sh {os.path.dirname(os.path.dirname(args.peer_python))}' "
            "or pass --peer_python")
  threads = [int(t) for t in args.threads.split(",") if t]
  tmp = tempfile.mkdtemp(prefix="fszjax-peers-")
  weights = os.path.join(tmp, "vit_b32.safetensors")
  reference = None
  runs: dict = {w: {"fszjax": []} | {f"peer_t{t}": [] for t in threads} for w in works}
  t_start = time.time()
  print(f"# load average at start: {os.getloadavg()}, {os.cpu_count()} CPUs", flush=True)
  for rnd in range(args.rounds):
    for w in works:
      steps, warm = STEPS[w]
      peer_first = rnd % 2 == 1  # A B A B ... then B A: neither side always goes first
      order = ["peer", "fszjax"] if peer_first else ["fszjax", "peer"]
      if w == "encode" and rnd == 0:
        order = ["peer", "fszjax"]  # the peer writes the weights fszjax converts
      for side in order:
        if side == "peer":
          for t in threads:
            write = weights if (w == "encode" and not os.path.exists(weights)) else ""
            r = _run(args.peer_python, f"peer:{w}", steps, warm, args.timeout, threads=t,
                     weights=write, cwd="/")
            if w == "encode" and "embedding_head" in r:
              reference = r.pop("embedding_head")
            runs[w][f"peer_t{t}"].append(r)
            print(json.dumps({"round": rnd, "work": w, "side": f"peer {t} thread(s)", **_brief(r, w)}),
                  flush=True)
        else:
          r = _run(sys.executable, f"fszjax:{w}", steps, warm, args.timeout, weights=weights,
                   reference=reference)
          runs[w]["fszjax"].append(r)
          print(json.dumps({"round": rnd, "work": w, "side": "fszjax", **_brief(r, w)}), flush=True)
  summary = _summarise(runs, works, threads)
  summary["wall_s"] = round(time.time() - t_start, 1)
  summary["load_1m_end"] = round(os.getloadavg()[0], 2)
  print("\n" + _table(summary), flush=True)
  print(json.dumps(summary), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"summary": summary, "runs": runs}, f, indent=1)
  return 0


def _brief(r: dict, work: str) -> dict:
  if "error" in r:
    return {"error": r["error"]}
  out = {"rate": round(_rate(r, work), 2), "unit": UNITS[work], "cores": r.get("cores_measured"),
         "load_1m": r.get("load_1m")}
  if "max_abs_diff_vs_peer" in r:
    out["max_abs_diff_vs_peer"] = r["max_abs_diff_vs_peer"]
  return out


def _rate(r: dict, work: str) -> float:
  per_step = {"train": TRAIN["batch"], "encode": ENCODE["batch"], "maml": MAML["meta_batch"]}[work]
  return per_step / r["step_s"]


def _summarise(runs: dict, works, threads) -> dict:
  out: dict = {"workloads": {}}
  for w in works:
    sides = {}
    for name, rs in runs[w].items():
      ok = [r for r in rs if "error" not in r]
      if not ok:
        sides[name] = {"error": rs[0]["error"] if rs else "not run"}
        continue
      sides[name] = {
          "rate_median": round(statistics.median(_rate(r, w) for r in ok), 2),
          "rates": [round(_rate(r, w), 2) for r in ok],
          "cores": [r.get("cores_measured") for r in ok],
          "load_1m": [r.get("load_1m") for r in ok],
          "config": ok[0].get("config"), "settings": ok[0].get("settings"),
      }
      if "max_abs_diff_vs_peer" in ok[-1]:
        sides[name]["max_abs_diff_vs_peer"] = ok[-1]["max_abs_diff_vs_peer"]
    entry = {"unit": UNITS[w], "sides": sides}
    peers = {k: v for k, v in sides.items() if k.startswith("peer") and "rate_median" in v}
    fz = sides.get("fszjax", {})
    if peers and "rate_median" in fz:
      best = max(peers, key=lambda k: peers[k]["rate_median"])
      entry["best_peer"] = best
      if peers[best]["settings"] != fz["settings"]:
        entry["ratio"] = None
        entry["refused"] = ("settings differ: fszjax " + json.dumps(fz["settings"], sort_keys=True)
                            + " vs peer " + json.dumps(peers[best]["settings"], sort_keys=True))
      else:
        entry["ratio"] = round(fz["rate_median"] / peers[best]["rate_median"], 2)
    out["workloads"][w] = entry
  return out


def _table(summary: dict) -> str:
  lines = ["| work | fszjax | peer (best of thread settings) | ratio | load (1 min) |",
           "|---|---:|---:|---:|---|"]
  names = {"train": "contrastive train step (open_clip)", "encode": "encode_image ViT-B-32 (open_clip)",
           "maml": "2nd-order MAML Conv-4 5w1s (learn2learn)"}
  for w, e in summary["workloads"].items():
    fz = e["sides"].get("fszjax", {})
    best = e.get("best_peer")
    pe = e["sides"].get(best, {}) if best else {}
    others = ", ".join(f"{k[5:]}: {v['rate_median']}" for k, v in e["sides"].items()
                       if k.startswith("peer") and "rate_median" in v)
    ratio = e.get("ratio")
    ratio_s = f"{ratio}x" if ratio is not None else ("refused: " + e["refused"] if "refused" in e else "n/a")
    loads = [l for s in e["sides"].values() for l in s.get("load_1m", []) if l]
    load_s = f"{min(min(l) for l in loads):.1f}-{max(max(l) for l in loads):.1f}" if loads else "?"
    lines.append(f"| {names[w]} ({e['unit']}) | {fz.get('rate_median', fz.get('error'))} | "
                 f"{pe.get('rate_median', pe.get('error', 'n/a'))} ({others}) | {ratio_s} | {load_s} |")
  return "\n".join(lines)


if __name__ == "__main__":
  raise SystemExit(main())
