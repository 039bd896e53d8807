"""`fszjax bench adapt`: meta-training throughput (tasks/s) on synthetic episodes.

The default workload is learn2learn's Omniglot MAML example (and the peer benchmark in
``/work/shared/peers/l2l_maml_bench.py``): second-order MAML on Conv-4 with per-task batch
norm, 5-way 1-shot, 1 query per class, 5 inner steps (lr 0.4), meta-batch 32, 28x28x1
random-normal images, Adam 1e-3.

Every result has a ``learn2learn_setting`` line saying whether it ran exactly that setting.

``tasks_per_sec = meta_batch / median(step time)`` over the timed steps; compilation (the
first call) and `warmup` further steps are excluded. Output: one JSON line.

Importable without grain / tensorflow-datasets (the GPU machine may lack them).

Settings are the keys of an `fszjax adapt` config (fszjax/config_defaults.py,
`adapt_config`): its Conv-4 meta-training section ``fewshot.meta`` and ``fewshot.image_size``,
plus the ``bench`` section (timed steps, warmup, strategy, image channels). The config is
``--config C`` (e.g. configs/glyphs_maml_conv4.py) or, without one, `learn2learn_config`;
``--config.a.b=v`` overrides it as everywhere else. The flat names of `SETTINGS`
(keyword arguments, ``--hidden=4`` flags of ``python -m fszjax.fewshot.bench``) are
shorthands for those keys and override them.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import statistics
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fszjax import config as config_lib
from fszjax import config_defaults
from fszjax import sharding as shd
from fszjax.config import split_overrides
from fszjax.errors import UserError
from fszjax.fewshot import conv4
from fszjax.fewshot import meta as meta_lib

# Flat setting name -> the adapt config key it stands for. n_way and k_shot are the numbers
# of ``fewshot.meta.train_setting`` ("5way1shot").
SETTINGS: dict[str, str] = {
    "algorithm": "fewshot.meta.algorithm",
    "n_way": "fewshot.meta.train_setting",
    "k_shot": "fewshot.meta.train_setting",
    "q_query": "fewshot.meta.q_query",
    "inner_steps": "fewshot.meta.inner_steps",
    "inner_lr": "fewshot.meta.inner_lr",
    "first_order": "fewshot.meta.first_order",
    "meta_batch": "fewshot.meta.meta_batch",
    "image_size": "fewshot.image_size",
    "channels": "bench.channels",
    "hidden": "fewshot.meta.hidden",
    "layers": "fewshot.meta.layers",  # conv blocks (Conv-4); fewer only for quick tests
    "norm": "fewshot.meta.norm",
    "pool": "fewshot.meta.pool",
    "head_init": "fewshot.meta.head_init",
    "adapt": "fewshot.meta.adapt",
    # conv4.FORMULATIONS, or (bench only) 'auto': im2col on CPU, conv elsewhere.
    "formulation": "fewshot.meta.formulation",
    # Tasks vmapped together; (bench only) -1: auto (4 on CPU, 0 = one vmap elsewhere).
    "task_chunk": "fewshot.meta.task_chunk",
    "remat": "fewshot.meta.remat",
    "compute_dtype": "fewshot.meta.compute_dtype",  # or 'bfloat16' (f32 accumulation)
    "outer_lr": "fewshot.meta.outer_lr",
    "steps": "bench.steps",
    "warmup": "bench.warmup",
    "devices": "fewshot.meta.devices",  # 0: all devices if meta_batch divides, else 1
    "strategy": "bench.strategy",  # meta_batch | task_loop
    "seed": "seed",
}


# learn2learn's benchmark (its Omniglot MAML example; /work/shared/peers/l2l_maml_bench.py and
# benchmarks/peers.py): `learn2learn_config` equals it; every result says whether it ran it.
LEARN2LEARN_SETTING: dict[str, Any] = {
    "algorithm": "maml", "first_order": False, "n_way": 5, "k_shot": 1, "q_query": 1,
    "inner_steps": 5, "inner_lr": 0.4, "meta_batch": 32, "image_size": 28, "channels": 1,
    "hidden": 64, "layers": 4, "norm": "batch", "outer_lr": 1e-3,
}
# ... and its model: every parameter adapts, the head is meta-learned, features are the
# spatial mean of the last map (learn2learn's OmniglotCNN).
LEARN2LEARN_MODEL: dict[str, Any] = {"adapt": "all", "head_init": "learned", "pool": "mean"}


def learn2learn_differences(s: Mapping[str, Any]) -> dict[str, Any]:
  """``{key: (this value, learn2learn's)}`` for each setting that differs from
  `LEARN2LEARN_SETTING` (and `LEARN2LEARN_MODEL`); empty when the run is learn2learn's
  benchmark setting."""
  ref = {**LEARN2LEARN_SETTING, **LEARN2LEARN_MODEL}
  return {k: (s.get(k), v) for k, v in ref.items() if s.get(k) != v}


class BenchError(UserError):
  """A bad bench setting; the CLI shows it as one line (no traceback)."""


def learn2learn_config() -> ml_collections.ConfigDict:
  """The default workload as an adapt config: the adapt defaults with the Conv-4 backbone at
  learn2learn's setting, the layout chosen per platform (formulation 'auto', task_chunk -1)
  and remat on."""
  c = config_defaults.adapt_config(ml_collections.ConfigDict())  # no data: synthetic tasks
  c.name = "learn2learn_maml"
  c.fewshot.backbone = "conv4"
  c.fewshot.meta.update(dict(formulation="auto", task_chunk=-1, remat=True))
  for name, value in {**LEARN2LEARN_SETTING, **LEARN2LEARN_MODEL}.items():
    _set(c, name, value)
  return c


def _way_shot(setting: str) -> tuple[int, int]:
  m = re.fullmatch(r"(\d+)way(\d+)shot", str(setting))
  if not m:
    raise BenchError(f"config.fewshot.meta.train_setting={setting!r}: use e.g. '5way1shot'")
  return int(m.group(1)), int(m.group(2))


def _set(cfg: ml_collections.ConfigDict, name: str, value: Any) -> None:
  """Sets flat setting `name` (`SETTINGS`) in `cfg`."""
  if name in ("n_way", "k_shot"):
    n, k = _way_shot(cfg.fewshot.meta.train_setting)
    n, k = (value, k) if name == "n_way" else (n, value)
    cfg.fewshot.meta.train_setting = f"{int(n)}way{int(k)}shot"
  else:
    config_lib.set_value(cfg, SETTINGS[name], value)


def settings_of(cfg: ml_collections.ConfigDict) -> dict:
  """The flat settings (`SETTINGS`) of an adapt config."""
  out = {}
  for name, key in SETTINGS.items():
    node = cfg
    for part in key.split("."):
      node = node[part]
    out[name] = node
  out["n_way"], out["k_shot"] = _way_shot(cfg.fewshot.meta.train_setting)
  return out


def _merge(cfg: ml_collections.ConfigDict, partial: Mapping, node=None, prefix: str = "") -> None:
  """Sets every leaf of nested mapping `partial` in `cfg` (unknown keys: one-line error)."""
  node = cfg if node is None else node
  for k, v in partial.items():
    sub = node[k] if k in node else None
    if isinstance(v, Mapping) and isinstance(sub, ml_collections.ConfigDict):
      _merge(cfg, v, sub, f"{prefix}{k}.")
    else:
      config_lib.set_value(cfg, f"{prefix}{k}", v)


def bench_config(config: Any = None, **kwargs) -> ml_collections.ConfigDict:
  """The adapt config a run times: `config` (a loaded adapt config; a mapping of flat
  `SETTINGS`; or a partial adapt config as nested dicts over `learn2learn_config`), or
  `learn2learn_config` when None, with the flat settings of `kwargs` applied."""
  if isinstance(config, ml_collections.ConfigDict):
    if "fewshot" not in config:
      raise BenchError("bench adapt times Conv-4 meta-training; pass an adapt config "
                       "(configs/glyphs_maml_conv4.py) or none")
    cfg = config.copy_and_resolve_references()
  else:
    cfg = learn2learn_config()
    if config and all(k in SETTINGS for k in config):
      kwargs = {**config, **kwargs}  # a flat mapping of settings
    elif config:
      _merge(cfg, config)
  bad = sorted(set(kwargs) - set(SETTINGS))
  if bad:
    raise BenchError(f"bench adapt: unknown setting(s) {bad}; known: {sorted(SETTINGS)}")
  for name, value in kwargs.items():
    _set(cfg, name, value)
  return cfg


def resolve_settings(config: Any = None, **kwargs) -> dict:
  """The flat settings (`SETTINGS`) of `bench_config(config, **kwargs)`."""
  return settings_of(bench_config(config, **kwargs))


def _synthetic_tasks(s: dict, key):
  t, n = s["meta_batch"], s["n_way"]
  shape = (s["image_size"], s["image_size"], s["channels"])
  ks, kq = jax.random.split(key)
  return {
      "support_x": jax.random.normal(ks, (t, n * s["k_shot"]) + shape, jnp.float32),
      "support_y": jnp.tile(jnp.repeat(jnp.arange(n, dtype=jnp.int32), s["k_shot"]), (t, 1)),
      "query_x": jax.random.normal(kq, (t, n * s["q_query"]) + shape, jnp.float32),
      "query_y": jnp.tile(jnp.repeat(jnp.arange(n, dtype=jnp.int32), s["q_query"]), (t, 1)),
  }


def _time(fn, steps: int, warmup: int) -> tuple[float, list[float]]:
  """(compile+first-call seconds, per-step seconds) of `fn()` (which blocks)."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return first, times


def bench_adapt(config: Any = None, **kwargs) -> dict:
  """Times meta-training steps on synthetic Conv-4 episodes; returns a JSON-able dict.

  Args:
    config: an adapt config, a mapping of settings or a partial adapt config, or None
      (learn2learn's workload); see `bench_config`.
    **kwargs: settings of `SETTINGS` (override the config).
  Returns:
    dict with tasks_per_sec, step_time_s (median), compile_s, algorithm, n_way, k_shot,
    q_query, inner_steps, meta_batch, formulation, task_chunk, remat, strategy, devices,
    platform, device_kind.
  """
  cfg = bench_config(config, **kwargs)
  if cfg.fewshot.backbone != "conv4":
    raise BenchError(f"bench adapt times Conv-4 meta-training; this config's backbone is "
                     f"{cfg.fewshot.backbone!r}: pass a Conv-4 config "
                     "(configs/glyphs_maml_conv4.py) or none")
  s = settings_of(cfg)
  platform = jax.default_backend()
  formulation, chunk, ndev = _layout(s, platform)
  run, chunk, ndev = _make_run(s, formulation, chunk, ndev)
  first, times = _time(run, s["steps"], s["warmup"])
  med = statistics.median(times)
  t = s["meta_batch"]
  return {
      "bench": "adapt", "algorithm": s["algorithm"], "n_way": s["n_way"], "k_shot": s["k_shot"],
      "q_query": s["q_query"], "inner_steps": s["inner_steps"], "meta_batch": t,
      "tasks_per_sec": round(t / med, 3), "step_time_s": round(med, 5),
      "step_time_min_s": round(min(times), 5), "compile_s": round(first - med, 3),
      "formulation": formulation, "task_chunk": chunk, "remat": s["remat"], "norm": s["norm"],
      "pool": s["pool"], "head_init": s["head_init"], "compute_dtype": s["compute_dtype"],
      "strategy": s["strategy"], "devices": ndev, "platform": platform,
      "device_kind": jax.devices()[0].device_kind, "steps": s["steps"],
      "jax_version": jax.__version__,
      "learn2learn_setting": _l2l_note(s),
  }


def _layout(s: dict, platform: str) -> tuple[str, int, int]:
  """``(formulation, task_chunk, devices)`` with 'auto' / -1 / 0 resolved and checked."""
  formulation = s["formulation"]
  if formulation == "auto":
    formulation = "im2col" if platform == "cpu" else "conv"
  chunk = s["task_chunk"]
  if chunk < 0:
    chunk = 4 if platform == "cpu" else 0
  t = s["meta_batch"]
  ndev = s["devices"] or (jax.device_count() if t % jax.device_count() == 0 else 1)
  if ndev > jax.device_count():
    raise BenchError(f"devices={ndev} but only {jax.device_count()} are available")
  if t % ndev:
    raise BenchError(f"meta_batch={t} is not divisible by devices={ndev}")
  if chunk and (t // ndev) % chunk:
    chunk = 0 if (t // ndev) < chunk else next(c for c in range(chunk, 0, -1) if (t // ndev) % c == 0)
  return formulation, chunk, ndev


def _make_run(s: dict, formulation: str, chunk: int, ndev: int):
  """``(run, task_chunk, devices)``: `run()` does one meta-training step and blocks."""
  t = s["meta_batch"]
  cfg = meta_lib.MetaConfig(
      algorithm=s["algorithm"], n_way=s["n_way"], inner_steps=s["inner_steps"],
      inner_lr=s["inner_lr"], adapt=s["adapt"], first_order=s["first_order"],
      remat=s["remat"], head_init=s["head_init"], task_chunk=chunk)
  key = jax.random.key(s["seed"])
  kp, kt = jax.random.split(key)
  features_fn = conv4.make_conv4_features_fn(formulation, pool=s["pool"],
                                             compute_dtype=s["compute_dtype"])
  opt = optax.adam(s["outer_lr"]) if s["algorithm"] != "reptile" else optax.sgd(s["outer_lr"])

  @jax.jit
  def init(kp, kt):  # one compiled program instead of many eager ops
    params = conv4.init_conv4(kp, s["n_way"], in_channels=s["channels"], hidden=s["hidden"],
                              layers=s["layers"], norm=s["norm"], image_size=s["image_size"],
                              pool=s["pool"])
    meta_params = meta_lib.init_meta_params(cfg, params)
    return meta_params, opt.init(meta_params), _synthetic_tasks(s, kt)

  meta_params, opt_state, tasks = init(kp, kt)
  state = {"p": meta_params, "o": opt_state}

  if s["strategy"] == "meta_batch":
    mesh = None
    if ndev > 1:
      mesh = shd.make_mesh(ndev, 1, 1, devices=jax.devices()[:ndev])
      tasks = jax.device_put(tasks, meta_lib.task_shardings(mesh, tasks))
      state = jax.device_put(state, shd.replicated(mesh))
    step = meta_lib.make_meta_step(features_fn, cfg, opt, mesh=mesh)

    def run():
      state["p"], state["o"], _ = step(state["p"], state["o"], tasks)
      jax.block_until_ready(state["p"])
    return run, chunk, ndev
  if s["strategy"] == "task_loop":
    grad_one = jax.jit(lambda p, task: meta_lib.task_grad(p, task, features_fn=features_fn,
                                                         cfg=cfg)[0])
    apply = jax.jit(lambda p, o, g: _apply(opt, p, o, g, t), donate_argnums=(0, 1))
    per_task = [jax.tree.map(lambda x: x[i], tasks) for i in range(t)]

    def run_loop():
      total = None
      for task in per_task:
        g = grad_one(state["p"], task)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
      state["p"], state["o"] = apply(state["p"], state["o"], total)
      jax.block_until_ready(state["p"])
    return run_loop, None, 1
  raise BenchError(f"strategy={s['strategy']!r}: use 'meta_batch' or 'task_loop'")


def _l2l_note(s: Mapping[str, Any]) -> str:
  diff = learn2learn_differences(s)
  if not diff:
    return "same as learn2learn's benchmark (comparable with benchmarks/peers.py)"
  return ("NOT learn2learn's benchmark setting, not comparable with it: "
          + ", ".join(f"{k}={a!r} (learn2learn {b!r})" for k, (a, b) in diff.items()))


def _apply(opt, params, opt_state, grad_sum, t):
  grads = jax.tree.map(lambda g: g / t, grad_sum)
  updates, opt_state = opt.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _parse_value(raw: str) -> Any:
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    low = raw.lower()
    if low in ("true", "false"):
      return low == "true"
    return raw


def _load_config(path: str | None, overrides: Sequence[tuple[str, str]]) -> Any:
  """The adapt config at `path`, or `learn2learn_config`, with the overrides applied."""
  if path:
    return config_lib.load_config(path, list(overrides))
  cfg = learn2learn_config()
  config_lib.apply_overrides(cfg, overrides)
  config_lib.validate(cfg)
  return cfg


def main(argv: Any = None, overrides: Sequence[tuple[str, str]] | None = None) -> int:
  """CLI entry: ``main(['--config', C, '--steps', '10', '--algorithm=fomaml', ...])``.

  Also accepts the `fszjax` CLI's parsed ``(args, overrides)``: ``args.config``,
  ``args.steps`` and ``--config.a.b=v`` override pairs. Prints one JSON line.
  """
  kwargs: dict[str, Any] = {}
  if argv is None or isinstance(argv, (list, tuple)):
    ovr, rest = split_overrides(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(prog="fszjax bench adapt")
    parser.add_argument("--config", default=None)
    for k in SETTINGS:
      parser.add_argument(f"--{k}", default=None)
    parsed = vars(parser.parse_args(rest))
    kwargs = {k: _parse_value(v) for k, v in parsed.items() if k != "config" and v is not None}
    config = _load_config(parsed["config"], list(overrides or []) + ovr)
  else:  # argparse namespace from fszjax.cli
    args = argv
    config = _load_config(getattr(args, "config", None), list(overrides or []))
    if getattr(args, "steps", None):
      kwargs["steps"] = int(args.steps)
  print(json.dumps(bench_adapt(config, **kwargs)), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
