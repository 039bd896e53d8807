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

PREFIX = "--config."


def split_overrides(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
  """Splits ``--config.a.b=v`` / ``--config.a.b v`` pairs from the other arguments."""
  overrides, rest = [], []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a.startswith(PREFIX):
      body = a[len(PREFIX):]
      if "=" in body:
        k, v = body.split("=", 1)
      else:
        if i + 1 >= len(argv):
          raise SystemExit(f"fszjax: error: {a} needs a value: {a}=VALUE")
        k, v = body, argv[i + 1]
        i += 1
      overrides.append((k, v))
    else:
      rest.append(a)
    i += 1
  return overrides, rest


def _setup_runtime(args) -> None:
  """Configures the log and JAX before its backend starts (device count, platform, multi-host)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from fszjax import metrics

  metrics.setup_logging()  # fszjax at INFO, third parties at WARNING, no bars off a terminal
  import jax

  if args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", int(args.cpu_devices))
  if args.platform:
    jax.config.update("jax_platforms", args.platform)
  try:
    from fszjax import multihost
  except ImportError:
    return
  multihost.initialize_from_args(args)


def _cmd_bench(args, overrides) -> int:
  if args.what == "pretrain":
    from fszjax import bench

    return bench.main(args, overrides)
  from fszjax.fewshot import bench as fbench

  return fbench.main(args, overrides)


def _cmd_compile(args, overrides) -> int:
  from fszjax import aot

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
  c.set_defaults(func=_cmd_compile)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="fszjax", description="Zero-shot pretraining and few-shot, domain-robust fine-tuning in JAX.")
  p.add_argument("--cpu_devices", type=int, default=int(os.environ.get("FSZJAX_CPU_DEVICES", 0)),
                 help="simulate N CPU devices (sharding on a machine without accelerators)")
  p.add_argument("--platform", default=None, help="force a JAX platform: cpu, gpu, tpu")
  try:
    from fszjax import multihost

    multihost.add_flags(p)
  except ImportError:
    pass
  sub = p.add_subparsers(dest="command", required=True)

  b = sub.add_parser("bench", help="benchmarks on synthetic data (no dataset needed)")
  b.add_argument("what", choices=["pretrain", "adapt"])
  b.add_argument("--config", required=True, help="config file, e.g. configs/glyphs.py")
  b.add_argument("--steps", type=int, default=10, help="steps to time (the first compiles)")
  b.add_argument("--peak_tflops", type=float, default=None,
                 help="device peak TFLOP/s for MFU when the device is not known")
  b.set_defaults(func=_cmd_bench)
  _add_compile_parser(sub)

  for module, adder in (("fszjax.data.cli", "add_prepare_parser"),
                        ("fszjax.train_cli", "add_parsers"),
                        ("fszjax.fewshot.cli", "add_parsers"),
                        ("fszjax.convert.cli", "add_parsers")):
    try:
      mod = __import__(module, fromlist=[adder])
    except ImportError as e:
      if module.replace(".", "/") not in str(e) and module not in str(e):
        raise
      continue
    getattr(mod, adder)(sub)
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
    from fszjax.errors import is_user_error

    if is_user_error(e):
      print(f"fszjax: error: {e}", file=sys.stderr)
      return 2
    from fszjax import workdir  # a full disk / read-only file anywhere: one line, not a traceback

    reason = workdir.storage_fault(e)
    if reason is not None:
      print(f"fszjax: error: {workdir.describe_storage_error(e, reason)}", file=sys.stderr)
      return 2
    raise


if __name__ == "__main__":
  sys.exit(main())
