"""`fszjax <command>`: prepare, pretrain, eval, adapt, convert, bench, compile.

Config overrides use the big_vision convention and may appear anywhere after the
command: ``--config.loss=clip --config.mesh.data=2``.

Global options (before the command): ``--cpu_devices N`` simulates N CPU devices (for
trying meshes on a laptop), and the multi-host flags of `fszjax.multihost`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

# Set before JAX / TensorFlow load their C++ runtimes, which read it once.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=wrong-import-position
import jax  # noqa: E402

from fszjax import aot, bench, metrics, multihost, train_cli, workdir  # noqa: E402
from fszjax.config import split_overrides  # noqa: E402
from fszjax.convert import cli as convert_cli  # noqa: E402
from fszjax.data import cli as data_cli  # noqa: E402
from fszjax.errors import is_user_error  # noqa: E402
from fszjax.fewshot import bench as fewshot_bench  # noqa: E402
from fszjax.fewshot import cli as fewshot_cli  # noqa: E402


def _setup_runtime(args) -> None:
  """Configures the log and JAX before its backend starts (device count, platform, multi-host)."""
  metrics.setup_logging()  # fszjax at INFO, third parties at WARNING, no bars off a terminal
  if args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", int(args.cpu_devices))
  if args.platform:
    jax.config.update("jax_platforms", args.platform)
  multihost.initialize_from_args(args)


def _cmd_bench(args, overrides) -> int:
  if args.what == "pretrain":
    return bench.main(args, overrides)
  return fewshot_bench.main(args, overrides)


def _cmd_compile(args, overrides) -> int:
  return aot.main(args, overrides)


def _add_compile_parser(sub) -> None:
  c = sub.add_parser(
      "compile", help="compile the train step for a TPU topology on this host (no TPU needed)")
  c.add_argument("--config", required=True, help="config file, e.g. configs/siglip_b16.py")
  c.add_argument("--topology", required=True,
                 help="TPU slice: v5e:16x16, v6e:8x8, v5p:4x4x4, v4:2x2x2, or a Cloud TPU type "
                      "(v5litepod-256, v5p-128); 2xv5e:16x16 for two slices")
  c.add_argument("--num_slices", type=int, default=1,
                 help="slices joined over the data-centre network (config.mesh.data must be a "
                      "multiple)")
  c.add_argument("--no_eval", action="store_true", help="skip compiling the evaluation encoders")
  c.add_argument("--out", default="", help="also write the JSON report to this file")
  c.add_argument("--dump_hlo", default="", help="write the compiled train step's HLO text here")
  c.set_defaults(func=_cmd_compile)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="fszjax", description="Zero-shot pretraining and few-shot, domain-robust fine-tuning in JAX.")
  p.add_argument("--cpu_devices", type=int, default=int(os.environ.get("FSZJAX_CPU_DEVICES", 0)),
                 help="simulate N CPU devices (sharding on a machine without accelerators)")
  p.add_argument("--platform", default=None, help="force a JAX platform: cpu, gpu, tpu")
  multihost.add_flags(p)
  sub = p.add_subparsers(dest="command", required=True)

  b = sub.add_parser("bench", help="benchmarks on synthetic data (no dataset needed)")
  b.add_argument("what", choices=["pretrain", "adapt"])
  b.add_argument("--config", required=True, help="config file, e.g. configs/glyphs.py")
  b.add_argument("--steps", type=int, default=10, help="steps to time (the first compiles)")
  b.add_argument("--peak_tflops", type=float, default=None,
                 help="device peak TFLOP/s for MFU when the device is not known")
  b.set_defaults(func=_cmd_bench)
  _add_compile_parser(sub)

  data_cli.add_prepare_parser(sub)
  train_cli.add_parsers(sub)
  fewshot_cli.add_parsers(sub)
  convert_cli.add_parsers(sub)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides, rest = split_overrides(argv)
  parser = build_parser()
  args = parser.parse_args(rest)
  _setup_runtime(args)
  try:
    return int(args.func(args, overrides) or 0)
  except KeyboardInterrupt:
    print("fszjax: interrupted; rerun the same command to continue from the last checkpoint",
          file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    if is_user_error(e):
      print(f"fszjax: error: {e}", file=sys.stderr)
      return 2
    # A full disk / read-only file anywhere: one line, not a traceback.
    reason = workdir.storage_fault(e)
    if reason is not None:
      print(f"fszjax: error: {workdir.describe_storage_error(e, reason)}", file=sys.stderr)
      return 2
    raise


if __name__ == "__main__":
  sys.exit(main())
