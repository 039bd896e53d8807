"""The analysis half of `fszjax compile` (`fszjax.aot`): collectives and their sizes in
the compiled HLO, per-chip bytes of sharded trees, XLA's cost analysis, the figures of a
TPU out-of-memory error, the one-line fixes when a step does not fit, and the table
printed for people.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fszjax import sharding

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
# Share of the chip's HBM the compiled program may use before we call it a miss (libtpu
# itself reserves a little: a v5e reports 15.75 of 16 GiB available).
HBM_USABLE = 0.98


# ----------------------------------------------------------------------------- analysis


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def _shape_bytes(shape_text: str) -> int:
  """Bytes of an HLO result shape: ``bf16[64,128]{1,0}`` or a tuple of such."""
  total = 0
  for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape_text):
    if dt in _DTYPE_BYTES:
      total += int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) * _DTYPE_BYTES[dt]
  return total


def count_collectives(hlo_text: str) -> tuple[dict[str, int], dict[str, int]]:
  """``(counts, result bytes)`` of each collective in an HLO module's text (async pairs
  count once, by their start; an op inside a loop body counts once)."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  sizes = dict.fromkeys(COLLECTIVES, 0)
  ops = "|".join(re.escape(n) for n in COLLECTIVES)
  for m in re.finditer(rf"= (.*?) ({ops})(-start)?\(", hlo_text):
    counts[m.group(2)] += 1
    shape = m.group(1)
    if m.group(3):  # async start: (operands, results[, u32[] contexts]); take the results
      parts = [p for p in re.findall(r"[a-z]+\d*\[[\d,]*\]", shape) if not p.endswith("[]")]
      shape = " ".join(parts[len(parts) // 2:])
    sizes[m.group(2)] += _shape_bytes(shape)
  return counts, sizes


def per_chip_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s / arrays."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
  return total


def _cost(compiled) -> dict:
  try:
    c = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if isinstance(c, (list, tuple)):
    c = c[0] if c else {}
  return dict(c or {})


_SIZE = re.compile(r"([\d.]+)\s*([KMGT]?)i?B?\b")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int | None:
  m = _SIZE.fullmatch(text.strip())
  return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


def parse_oom(message: str) -> dict:
  """Figures from the TPU compiler's out-of-memory error (whichever of them it states)."""
  out = {}
  for key, pattern in (
      ("temp_bytes", r"HLO temporaries \(([^)]*)\)"),
      ("available_bytes", r"available HBM \(([^)]*)\)"),
      ("used_bytes", r"Used ([\d.]+[KMGT]?) of"),
      ("available_bytes", r"Used [\d.]+[KMGT]? of ([\d.]+[KMGT]?) hbm"),
      ("program_bytes", r"program ([\d.]+[KMGT]?)"),
  ):
    m = re.search(pattern, message)
    if m and key not in out:
      v = _size(m.group(1))
      if v is not None:
        out[key] = v
  return out


def _gb(n: float | None) -> str:
  """Bytes for people: GiB (MiB below 1 GiB), as the TPU compiler and `nvidia-smi` count."""
  if n is None:
    return "?"
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def suggest_fixes(config, mesh: Mesh, mem: dict, hbm: int) -> str:
  """One line naming what would make the step fit, with estimates where they are cheap.

  Temporaries (activations) scale with the examples per chip: fewer examples per chip and
  gradient accumulation are estimated by scaling them; FSDP over every chip divides the
  state; a remat policy needs another compile to measure.
  """
  budget = hbm * HBM_USABLE
  args, temps = mem.get("argument_bytes", 0), mem.get("temp_bytes", 0)
  extra_out = max(mem.get("output_bytes", 0) - mem.get("alias_bytes", 0), 0)
  need = args + temps + extra_out
  dp = sharding.data_parallel_size(mesh)
  per_chip = config.batch_size // dp
  fixes = []
  remat = config.model.remat
  if remat in ("none", "save_everything", "dots"):
    better = "dots_no_batch" if remat == "none" else "full"
    fixes.append(f"--config.model.remat={better} (or full; compile again to measure)")
  room = budget - args - extra_out
  if temps > 0 and room > 0:
    fit = int(per_chip * room / temps)
    if 1 <= fit < per_chip:
      fixes.append(f"--config.batch_size={fit * dp} ({fit} examples per chip, about "
                   f"{_gb(args + extra_out + temps * fit / per_chip)})")
    accum = int(config.grad_accum)
    for k in range(max(accum, 1) * 2, per_chip + 1):
      if per_chip % k == 0 and temps * accum / k <= room:
        fixes.append(f"--config.grad_accum={k} (same batch, about "
                     f"{_gb(args + extra_out + temps * accum / k)})")
        break
  if mesh.shape["data"] > 1 or mesh.shape["tensor"] > 1:
    n = mesh.devices.size
    state = mem.get("state_bytes_total", 0)
    if state:
      fixes.append(f"--config.mesh.data=1 --config.mesh.fsdp=-1 (state {_gb(state / n)} instead "
                   f"of {_gb(mem.get('state_bytes', 0))} per chip)")
  elif args > budget / 2:
    fixes.append("a larger slice (more fsdp shards)")
  head = f"does not fit: about {_gb(need)} per chip of {_gb(hbm)} HBM"
  return head + "; fixes: " + "; ".join(fixes) if fixes else head + "; use a larger slice"


# ----------------------------------------------------------------------------- output


def format_table(r: dict) -> str:
  """The report as a few aligned lines for people."""
  mem = r.get("memory", {})
  rows = [
      ("topology", f"{r['topology']} ({r['accelerator_type']}, {r['chips']} x {r['chip']}), "
                   f"mesh {r['mesh']}"),
      ("batch", f"{r['global_batch']} global, {r['per_chip_batch']} per chip, grad_accum "
                f"{r['grad_accum']}, remat {r['remat']}, {r['dtype']}"),
      ("params", f"{r['params'] / 1e6:.1f} M; train state {_gb(r['state_bytes'])} per chip "
                 f"({_gb(r['state_bytes_total'])} total)"),
      ("memory/chip", "  ".join(f"{k.removesuffix('_bytes')} {_gb(v)}" for k, v in mem.items())
       + f"  | HBM {_gb(r['hbm_bytes'])}"),
      ("fits", str(r["fits"]).lower()),
  ]
  if r.get("fix"):
    rows.append(("fix", r["fix"]))
  if "collectives" in r:
    rows.append(("collectives", "  ".join(
        f"{k} {v} ({_gb(r['collective_result_bytes'][k])})" for k, v in r["collectives"].items())
        + "  (static counts and result sizes in the HLO; a loop body counts once)"))
    rows.append(("flops/chip", f"model {r['model_flops_per_chip'] / 1e12:.2f} T; XLA "
                 f"{r['xla_flops_per_chip'] / 1e12:.2f} T as counted (loop bodies once), "
                 f"x{r['xla_loop_correction']} = {r['xla_flops_per_chip_corrected'] / 1e12:.2f} T"))
    rows.append(("HBM traffic", f"{_gb(r['xla_bytes_per_chip_corrected'])} per chip per step "
                 f"(XLA, corrected the same way)"))
    mfu = r["mfu_upper_bound"]
    rows.append(("roofline", f"{r['roofline_step_s'] * 1e3:.1f} ms/step ({r['roofline_bound']}-"
                 f"bound: compute {r['compute_time_s'] * 1e3:.1f} ms, HBM "
                 f"{r['hbm_time_s'] * 1e3:.1f} ms), MFU upper bound {mfu:.1%}"
                 if mfu is not None else "n/a"))
  rows.append(("compile", f"{r['compile_s']:.1f} s"))
  for name, e in (r.get("eval") or {}).items():
    if isinstance(e, dict):
      rows.append((f"eval {name}", f"batch {r['eval']['batch_size']}: peak "
                   f"{_gb(e.get('peak_bytes', e.get('temp_bytes')))}, fits "
                   f"{str(e['fits']).lower()}, compile {e['compile_s']} s"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
