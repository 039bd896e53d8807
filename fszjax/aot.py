"""Ahead-of-time compilation for an accelerator topology on any host (`fszjax compile`).

    fszjax compile --config configs/siglip_b16.py --topology v5e:16x16

libtpu (``pip install -e ".[tpu]"``) describes a TPU slice without the hardware
(`jax.experimental.topologies.get_topology_desc`, compile-only devices). The train step
of `fszjax.pretrain` is lowered on a mesh of those devices with abstract arguments
(`ShapeDtypeStruct`s carrying the run's shardings) and compiled by the real TPU compiler,
so the per-chip memory, the collectives and XLA's cost analysis are those of the run.
The evaluation encoders are compiled the same way (parameters sharded as in training,
one evaluation batch on every chip, as `fszjax.evaluate.EmbeddingEncoder` runs them).

Reported per chip: argument / output / temporary bytes against the chip's HBM and
``fits``; the analytic model FLOPs (`fszjax.flops`) and XLA's FLOPs and bytes (XLA
counts a loop body once: scanned layers and gradient-accumulation micro-batches are
corrected for by `flops.scan_count_ratio`); the collectives in the compiled HLO (static
counts: an op inside a loop counts once); the compile time; a roofline step time
``max(flops / peak, bytes / bandwidth)`` (compute and HBM traffic only: communication is
not modelled) and the MFU upper bound it implies. When the step does not fit, one line
names the fixes with the figures that can be estimated without another compile.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import xla_bridge
from jax.experimental import mesh_utils, topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fszjax import config as config_lib
from fszjax import flops, pretrain, sharding
from fszjax.aot_report import (COLLECTIVES, HBM_USABLE, _cost, count_collectives,
                               format_table, parse_oom, per_chip_bytes, suggest_fixes)
from fszjax.errors import UserError
from fszjax.models.two_tower import TwoTower, build_model



class CompileError(UserError):
  """A topology, config or mesh that cannot be compiled; the message names the fix."""


# ----------------------------------------------------------------------------- topology


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice (or several) as libtpu names it."""

  family: str                 # CHIPS key: v4, v5e, v5p, v6e
  shape: tuple[int, ...]      # chips per dimension
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return int(np.prod(self.shape))

  @property
  def chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def name(self) -> str:
    base = f"{self.family}:{'x'.join(map(str, self.shape))}"
    return base if self.num_slices == 1 else f"{self.num_slices}x{base}"

  @property
  def accelerator_type(self) -> str:
    """The Cloud TPU name of one slice (v5litepod-16, v5p-128: v4/v5p count TensorCores)."""
    n = self.chips_per_slice
    if self.family in ("v4", "v5p"):
      return f"{self.family}-{2 * n}"
    return f"{'v5litepod' if self.family == 'v5e' else self.family}-{n}"

  def libtpu_kwargs(self) -> dict:
    # v4 and v5p chips hold two TensorCores; "megacore" makes each chip one device, as
    # JAX sees them on the VM. libtpu calls the v5p "v5".
    name = {"v5p": "v5"}.get(self.family, self.family) + ":" + "x".join(map(str, self.shape))
    kw: dict[str, Any] = {"topology_name": name}
    if self.family in ("v4", "v5p"):
      kw["chip_config_name"] = "megacore"
    if self.num_slices > 1:
      kw["num_slices"] = self.num_slices
    return kw


_FAMILIES = {"v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5lite": "v5e", "v5p": "v5p",
             "v6e": "v6e", "v6": "v6e"}
_GPU_NAMES = ("gpu", "cuda", "a100", "h100", "h200", "b200", "l4", "nvidia")


def _default_shape(family: str, chips: int) -> tuple[int, ...]:
  """Cloud TPU's shape of a slice of `chips` chips: 2-D for v5e/v6e (16 -> 4x4, 32 -> 4x8),
  3-D for v4/v5p (4 -> 2x2x1, 16 -> 2x2x4, 64 -> 4x4x4)."""
  if chips < 1 or chips & (chips - 1):
    raise CompileError(f"{chips} chips: slices have a power-of-two number of chips; "
                       "pass the shape instead, e.g. --topology v5p:4x4x8")
  dims = [1, 1] if family in ("v5e", "v6e") else [1, 1, 1]
  i = 0
  while int(np.prod(dims)) < chips:
    dims[i % len(dims)] *= 2
    i += 1
  return tuple(sorted(dims, key=lambda d: (d == 1, d)))


def parse_topology(spec: str, num_slices: int = 1) -> Topology:
  """``v5e:16x16``, ``v5p:4x4x4``, ``v4:2x2x2``, ``v6e:8x8`` or a Cloud TPU accelerator type
  (``v5litepod-256``, ``v5e-256``, ``v5p-128`` (TensorCores), ``v6e-64``, ``v4-32``).

  A leading ``Nx`` (``2xv5e:16x16``) asks for N slices (multi-slice over the data-centre
  network), as does ``num_slices``.
  """
  s = spec.strip().lower()
  m = re.fullmatch(r"(\d+)x(v.+)", s)
  if m:
    num_slices, s = int(m.group(1)), m.group(2)
  if num_slices < 1:
    raise CompileError(f"--num_slices={num_slices}: use 1 or more")
  if any(s.startswith(g) for g in _GPU_NAMES):
    raise CompileError(
        f"--topology {spec}: GPU topologies cannot be compiled without the GPUs (JAX has no "
        "compile-only GPU devices); compile for a TPU topology here, or run `fszjax bench "
        "pretrain` (benchmarks/gpu.sh) on the GPU machine")
  m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod|v5lite|v6):(\d+(?:x\d+)*)", s)
  if m:
    family = _FAMILIES[m.group(1)]
    shape = tuple(int(d) for d in m.group(2).split("x"))
    want = 2 if family in ("v5e", "v6e") else 3
    if len(shape) != want or min(shape) < 1:
      example = "v5e:16x16" if want == 2 else f"{family}:4x4x4"
      raise CompileError(f"--topology {spec}: a {family} slice has {want} dimensions, e.g. "
                         f"{example}")
    return Topology(family, shape, num_slices)
  m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod)-(\d+)", s)
  if m:
    family = _FAMILIES[m.group(1)]
    n = int(m.group(2))
    if family in ("v4", "v5p"):  # the number counts TensorCores, two per chip
      if n % 2:
        raise CompileError(f"--topology {spec}: {family} sizes count TensorCores (even)")
      n //= 2
    return Topology(family, _default_shape(family, n), num_slices)
  raise CompileError(
      f"--topology {spec}: not a TPU topology; use e.g. v5e:16x16, v6e:8x8, v5p:4x4x4, "
      "v4:2x2x2 or a Cloud TPU type such as v5litepod-256 or v5p-128")


def _prepare_host(topo: Topology) -> None:
  """Quiets libtpu's search for a real TPU and keeps JAX's own backend on the CPU."""
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # Compile-only use needs no exclusive hold on a TPU: skip libtpu's /tmp/libtpu_lockfile
  # (another JAX process on this host may hold it).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not xla_bridge.backends_are_initialized() and not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")


def topology_devices(topo: Topology) -> list:
  """Compile-only devices of `topo` (needs libtpu)."""
  _prepare_host(topo)
  try:
    # Lazy: libtpu is an optional, large package (the `tpu` extra).
    import libtpu  # noqa: F401  (libtpu: optional TPU compiler, the tpu extra)
  except ImportError:
    raise CompileError(
        "compiling for a TPU topology needs libtpu: pip install -e \".[tpu]\" (or pip install "
        f"\"jax[tpu]=={jax.__version__}\")") from None
  try:
    desc = topologies.get_topology_desc(platform="tpu", **topo.libtpu_kwargs())
  except Exception as e:  # pylint: disable=broad-except
    raise CompileError(f"libtpu does not know the topology {topo.name}: "
                       f"{str(e).splitlines()[0]}; check the slice shape") from None
  return list(desc.devices)


def mesh_for(config, devices: list, num_slices: int = 1) -> Mesh:
  """The run's ``(data, fsdp, tensor)`` mesh laid out on `devices` as on the real slice.

  With several slices, ``data`` spans the slices (only the gradient reduction of data
  parallelism crosses the data-centre network); each slice holds ``data / num_slices``.
  """
  mc = config.mesh
  shape = sharding.resolve_mesh_shape(mc.data, mc.fsdp, mc.tensor, len(devices))
  if num_slices > 1:
    if shape[0] % num_slices:
      raise CompileError(
          f"{num_slices} slices: config.mesh.data={shape[0]} must be a multiple of "
          f"{num_slices} (data parallelism spans the slices); pass --config.mesh.data="
          f"{num_slices}")
    ici = (shape[0] // num_slices, shape[1], shape[2])
    arr = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices)
  else:
    arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return sharding.make_mesh(*shape, devices=list(arr.flat))


# ----------------------------------------------------------------------------- compile


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {
      "argument_bytes": int(m.argument_size_in_bytes),
      "output_bytes": int(m.output_size_in_bytes),
      "alias_bytes": int(m.alias_size_in_bytes),
      "temp_bytes": int(m.temp_size_in_bytes),
      "generated_code_bytes": int(getattr(m, "generated_code_size_in_bytes", 0) or 0),
  }
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                       + out["temp_bytes"] + out["generated_code_bytes"])
  return out


def _compile(jitted, *args) -> tuple[Any, float, str | None]:
  """``(compiled or None, seconds, out-of-memory message or None)``."""
  t0 = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except
    msg = str(e)
    if "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg:
      return None, time.perf_counter() - t0, msg
    if type(e).__name__ == "IndivisibleError":
      m = re.search(r"partitioned (\d+) times, but the dimension size is (\d+)", msg)
      what = (f"a parameter dimension of {m.group(2)} does not split {m.group(1)} ways"
              if m else msg.splitlines()[0])
      raise CompileError(f"{what} on this mesh; choose config.mesh.fsdp (and data) so the "
                         "sharded dimensions divide, e.g. --config.mesh.data=2 halves fsdp") from None
    raise
  return compiled, time.perf_counter() - t0, None


def _eval_encoders(config, model: TwoTower, abstract_params, mesh: Mesh, hbm: int) -> dict:
  """Compiles image and text encoding at the evaluation batch, as the evaluator runs them."""
  bs = int(config.eval.batch_size or 256)
  img_shape, tok_shape = pretrain.input_shapes(config, bs)
  rep = NamedSharding(mesh, P())
  out = {"batch_size": bs}
  for name, method, arg in (
      ("image", TwoTower.encode_image, jax.ShapeDtypeStruct(img_shape, jnp.float32, sharding=rep)),
      ("text", TwoTower.encode_text, jax.ShapeDtypeStruct(tok_shape, jnp.int32, sharding=rep))):
    fn = jax.jit(lambda p, x, m=method: model.apply({"params": p}, x, method=m),
                 out_shardings=rep)
    with jax.set_mesh(mesh):
      compiled, secs, oom = _compile(fn, abstract_params, arg)
    if compiled is None:
      out[name] = {"fits": False, "compile_s": round(secs, 1), **parse_oom(oom or "")}
      continue
    mem = _memory(compiled)
    out[name] = {"fits": mem.get("peak_bytes", 0) <= hbm * HBM_USABLE,
                 "compile_s": round(secs, 1), **mem}
  return out


def compile_report(config, topo: Topology, with_eval: bool = True, dump_hlo: str = "") -> dict:
  """Compiles the train step (and the evaluation encoders) of `config` for `topo`; writes the
  compiled HLO text to `dump_hlo` if given."""
  chip = flops.CHIPS[topo.family]
  devices = topology_devices(topo)
  mesh = mesh_for(config, devices, topo.num_slices)
  rules = sharding.rules_from_config(config)
  sharding.check_global_batch(config.batch_size, mesh)
  model = build_model(config.model)
  tx, schedule = pretrain.make_optimizer(config.optim, config.total_steps,
                                         tuple(config.optim.freeze or ()))
  abstract = pretrain.abstract_train_state(config, mesh, rules, model)
  step = pretrain.make_train_step(model, tx, schedule, config, mesh, rules,
                                  state_shardings=sharding.shardings_of(abstract))
  img_shape, tok_shape = pretrain.input_shapes(config, config.batch_size)
  batch = {"image": jax.ShapeDtypeStruct(img_shape, jnp.float32,
                                         sharding=sharding.batch_sharding(mesh, 4)),
           "tokens": jax.ShapeDtypeStruct(tok_shape, jnp.int32,
                                          sharding=sharding.batch_sharding(mesh, 2))}
  with jax.set_mesh(mesh):
    compiled, compile_s, oom = _compile(step.jitted, abstract, batch)

  n = mesh.devices.size
  dp = sharding.data_parallel_size(mesh)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  state_total = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                    for x in jax.tree.leaves(abstract))
  accum = int(config.grad_accum)
  model_flops = flops.train_flops_per_step(config.model, config.batch_size)
  report: dict[str, Any] = {
      "topology": topo.name, "accelerator_type": topo.accelerator_type, "chip": chip.name,
      "chips": n, "num_slices": topo.num_slices, "mesh": dict(mesh.shape),
      "config": config.name, "global_batch": int(config.batch_size),
      "per_chip_batch": int(config.batch_size) // dp, "grad_accum": accum,
      "remat": config.model.remat, "dtype": config.model.dtype,
      "params": n_params, "state_bytes": per_chip_bytes(abstract),
      "state_bytes_total": state_total, "hbm_bytes": chip.hbm_bytes,
      "compile_s": round(compile_s, 1),
      "model_flops_per_step": model_flops, "model_flops_per_chip": model_flops / n,
  }
  if compiled is None:
    found = parse_oom(oom or "")
    mem = {"argument_bytes": per_chip_bytes((abstract, batch)), **found}
    if "temp_bytes" not in mem and "used_bytes" in mem:
      mem["temp_bytes"] = max(mem["used_bytes"] - mem["argument_bytes"], 0)
    report.update(memory=mem, fits=False, compiler_error=(oom or "").splitlines()[0][:300])
    report["fix"] = suggest_fixes(config, mesh, {**mem, "state_bytes": report["state_bytes"],
                                                 "state_bytes_total": state_total},
                                  chip.hbm_bytes)
    return report

  mem = _memory(compiled)
  fits = mem["peak_bytes"] <= chip.hbm_bytes * HBM_USABLE
  hlo = compiled.as_text()
  if dump_hlo:
    with open(dump_hlo, "w") as f:
      f.write(hlo)
  coll_counts, coll_bytes = count_collectives(hlo)
  ratio = flops.scan_count_ratio(config.model, config.batch_size, accum)
  cost = _cost(compiled)
  xf, xb = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  t_compute = xf * ratio / (chip.peak_tflops * 1e12)
  t_memory = xb * ratio / (chip.hbm_gbps * 1e9)
  t_step = max(t_compute, t_memory)
  report.update(
      memory=mem, fits=fits,
      xla_flops_per_chip=xf, xla_bytes_accessed_per_chip=xb, xla_loop_correction=round(ratio, 3),
      xla_flops_per_chip_corrected=xf * ratio, xla_bytes_per_chip_corrected=xb * ratio,
      collectives=coll_counts, collective_result_bytes=coll_bytes,
      compute_time_s=t_compute, hbm_time_s=t_memory,
      roofline_step_s=t_step, roofline_bound="compute" if t_compute >= t_memory else "memory",
      mfu_upper_bound=(model_flops / n) / (chip.peak_tflops * 1e12) / t_step if t_step else None,
      fix=None if fits else suggest_fixes(
          config, mesh, {**mem, "state_bytes": report["state_bytes"],
                         "state_bytes_total": state_total}, chip.hbm_bytes))
  if with_eval:
    params = abstract.params
    report["eval"] = _eval_encoders(config, model, params, mesh, chip.hbm_bytes)
  return report


def main(args, overrides) -> int:
  """`fszjax compile`: prints the JSON report on stdout, the table on stderr. Exit 0 when
  the train step fits, 1 when it does not."""
  topo = parse_topology(args.topology, args.num_slices)
  cfg = config_lib.load_config(args.config, overrides)
  report = compile_report(cfg, topo, with_eval=not args.no_eval,
                          dump_hlo=getattr(args, "dump_hlo", "") or "")
  line = json.dumps(report, default=float)
  print(line, flush=True)
  print(format_table(report), file=sys.stderr, flush=True)
  if args.out:
    with open(args.out, "w") as f:
      f.write(line + "\n")
  return 0 if report["fits"] else 1
