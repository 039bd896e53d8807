"""Multi-host wiring: `jax.distributed` before JAX starts, process-0 helpers, barriers.

fszjax is a multi-controller program: every host (TPU VM worker, SLURM task, local
process) runs the same command; `jax.distributed.initialize` joins them into one job
whose `jax.devices()` spans all hosts. How the job is found:
  explicit   ``--coordinator HOST:PORT --num_processes N --process_id I`` (or
             ``FSZJAX_COORDINATOR`` / ``FSZJAX_NUM_PROCESSES`` / ``FSZJAX_PROCESS_ID``):
             cluster detection is switched off (``cluster_detection_method="deactivate"``).
  cluster    on a Cloud TPU VM, under SLURM (``srun``) or Open MPI, JAX detects the
             coordinator, process count and id itself.
  local      a single process on a machine without a cluster: `pretrain` still starts a
             one-process runtime on 127.0.0.1, because JAX's preemption service
             (SIGTERM -> save a checkpoint at a step every process agrees on -> exit 0)
             lives in that runtime. ``--distributed off`` skips it.

`--dist_timeout S` shortens the initialisation, heartbeat and shutdown timeouts (a dead
peer then fails the job in about S seconds instead of minutes). `--local_device_ids`
restricts the accelerators one process uses (one process per GPU).

Conventions in the rest of fszjax: only process 0 logs progress and writes metrics,
plots, summaries and configs (`is_main()`); every process takes part in checkpoint
saves and restores (Orbax coordinates them); every process reads only its own shard of
the training data. Never install a SIGTERM handler: it would replace JAX's and the
preemption sync point would never be reached. JAX's handler takes SIGTERM for the whole
process: the job stops at the next step every process reaches, not at once (Ctrl-C and
SIGKILL still stop it at once). Commands that never poll the sync point (prepare, eval,
convert, adapt for now) get no one-process runtime, so SIGTERM ends them as usual.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import logging
import os
import socket
import sys
from typing import Any, Sequence

import jax
from jax.experimental import multihost_utils

from fszjax.errors import UserError

log = logging.getLogger("fszjax")

ENV = {
    "distributed": "FSZJAX_DISTRIBUTED",
    "coordinator": "FSZJAX_COORDINATOR",
    "num_processes": "FSZJAX_NUM_PROCESSES",
    "process_id": "FSZJAX_PROCESS_ID",
    "local_device_ids": "FSZJAX_LOCAL_DEVICE_IDS",
    "dist_timeout": "FSZJAX_DIST_TIMEOUT",
}
# Commands whose loops poll `reached_preemption` every step: a single local process runs
# them inside a one-process distributed runtime so that SIGTERM saves a checkpoint. Only
# list a command once its loop polls: JAX's handler swallows SIGTERM, so a command that
# never polls could then not be stopped by it.
PREEMPTIBLE_COMMANDS = ("pretrain", "adapt")

_STATE: dict[str, Any] = {"mode": None, "process_id": 0, "num_processes": 1, "timeout": None}
_BARRIER_COUNTS: dict[str, itertools.count] = {}


class MultihostError(UserError):
  """Inconsistent multi-host flags; the message names the fix (shown without traceback)."""


# ----------------------------------------------------------------------------- flags


def _env_int(name: str) -> int | None:
  v = os.environ.get(name, "").strip()
  if not v:
    return None
  try:
    return int(v)
  except ValueError:
    raise MultihostError(f"{name}={v!r} must be an integer") from None


def add_flags(parser: argparse.ArgumentParser) -> None:
  """Adds the multi-host flags (global options, before the command). Each defaults to its
  ``FSZJAX_*`` environment variable, so launchers can set them once for all processes."""
  g = parser.add_argument_group(
      "multi-host", "jax.distributed set-up (automatic on Cloud TPU VMs and under SLURM)")
  g.add_argument("--distributed", choices=("auto", "on", "off"),
                 default=os.environ.get(ENV["distributed"], "auto") or "auto",
                 help="auto: explicit flags, else a detected cluster, else a one-process "
                      "runtime for pretrain (SIGTERM saves a checkpoint); on: always "
                      "initialise; off: never [$FSZJAX_DISTRIBUTED]")
  g.add_argument("--coordinator", default=os.environ.get(ENV["coordinator"]) or None,
                 metavar="HOST:PORT", help="address of process 0 [$FSZJAX_COORDINATOR]")
  g.add_argument("--num_processes", type=int, default=None,
                 help="number of processes in the job [$FSZJAX_NUM_PROCESSES]")
  g.add_argument("--process_id", type=int, default=None,
                 help="this process's index, 0..num_processes-1 [$FSZJAX_PROCESS_ID]")
  g.add_argument("--local_device_ids", default=os.environ.get(ENV["local_device_ids"]) or None,
                 metavar="IDS", help="comma-separated local accelerator ids this process "
                                     "uses, e.g. 0 or 0,1 [$FSZJAX_LOCAL_DEVICE_IDS]")
  g.add_argument("--dist_timeout", type=int, default=None, metavar="SECONDS",
                 help="initialisation / heartbeat / shutdown timeout; small values make a "
                      "crashed peer fail the job fast [$FSZJAX_DIST_TIMEOUT]")


def _parse_ids(ids) -> list[int] | None:
  if ids is None or ids == "":
    return None
  if isinstance(ids, (list, tuple)):
    return [int(i) for i in ids]
  try:
    return [int(x) for x in str(ids).split(",") if x.strip()]
  except ValueError:
    raise MultihostError(f"--local_device_ids={ids!r}: use comma-separated integers, "
                         "e.g. 0,1") from None


# ----------------------------------------------------------------------------- detection


def _in_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM with TPU chips (JAX sets this flag when it is imported)."""
  try:
    from jax._src import cloud_tpu_init  # noqa: PLC0415  (private; guarded)

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))
  except Exception:  # pylint: disable=broad-except
    return False


def detect_cluster() -> str | None:
  """The cluster JAX can configure itself from: ``"tpu"``, ``"slurm"``, ``"ompi"`` or None.

  The tests are JAX's own (``jax._src.clusters``): SLURM needs the variables of an
  ``srun`` job step (SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID, ...).
  """
  env = os.environ
  if _in_cloud_tpu_vm():
    return "tpu"
  if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                            "SLURM_PROCID", "SLURM_LOCALID")):
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env:
    return "ompi"
  return None


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port free on `host` right now (for local coordinators)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return int(s.getsockname()[1])


def _is_loopback(address: str) -> bool:
  host = address.rsplit(":", 1)[0].strip("[]")
  return host in ("localhost", "127.0.0.1", "::1")


def _init_kwargs(timeout: int | None) -> dict[str, int]:
  """Timeout keyword arguments this JAX version's `initialize` accepts."""
  if not timeout:
    return {}

  params = inspect.signature(jax.distributed.initialize).parameters
  t = max(int(timeout), 1)
  out = {}
  for name in ("initialization_timeout", "heartbeat_timeout_seconds", "shutdown_timeout_seconds"):
    if name in params:
      out[name] = t
  return out


# ----------------------------------------------------------------------------- initialise


def plan(args) -> dict[str, Any] | None:
  """What `initialize_from_args` will do: None (no distributed runtime) or the keyword
  arguments of `jax.distributed.initialize` plus ``mode``. Pure: touches nothing."""
  mode = getattr(args, "distributed", "auto") or "auto"
  coordinator = getattr(args, "coordinator", None)
  num = getattr(args, "num_processes", None)
  pid = getattr(args, "process_id", None)
  num = _env_int(ENV["num_processes"]) if num is None else num
  pid = _env_int(ENV["process_id"]) if pid is None else pid
  ids = _parse_ids(getattr(args, "local_device_ids", None))
  timeout = getattr(args, "dist_timeout", None)
  timeout = _env_int(ENV["dist_timeout"]) if timeout is None else timeout
  command = getattr(args, "command", None)

  if mode == "off":
    if coordinator or (num or 1) > 1:
      raise MultihostError("--distributed off contradicts --coordinator/--num_processes; "
                           "drop one of them")
    return None
  kw: dict[str, Any] = {}
  if ids is not None:
    kw["local_device_ids"] = ids
  kw.update(_init_kwargs(timeout))
  explicit = coordinator is not None or num is not None or pid is not None
  cluster = detect_cluster()
  if explicit:
    if coordinator is not None and num is not None and pid is not None:
      if not 0 <= pid < num:
        raise MultihostError(f"--process_id={pid} must be in [0, --num_processes={num})")
      kw.update(coordinator_address=coordinator, num_processes=num, process_id=pid,
                cluster_detection_method="deactivate")
      if _is_loopback(coordinator):
        # Keep a local job's coordinator off the network.
        kw["coordinator_bind_address"] = "127.0.0.1:" + coordinator.rsplit(":", 1)[1]
      return {"mode": "explicit", **kw}
    if cluster is None:
      missing = [f for f, v in (("--coordinator", coordinator), ("--num_processes", num),
                                ("--process_id", pid)) if v is None]
      raise MultihostError(f"multi-host flags are incomplete: also pass {' '.join(missing)} "
                           "(or run under SLURM / on a Cloud TPU VM, where they are detected)")
    kw.update({k: v for k, v in (("coordinator_address", coordinator), ("num_processes", num),
                                 ("process_id", pid)) if v is not None})
    return {"mode": cluster, **kw}
  if cluster is not None:
    return {"mode": cluster, **kw}
  if mode == "on" or command in PREEMPTIBLE_COMMANDS:
    port = free_port()
    kw.update(coordinator_address=f"127.0.0.1:{port}", num_processes=1, process_id=0,
              cluster_detection_method="deactivate",
              coordinator_bind_address=f"127.0.0.1:{port}")
    return {"mode": "local", **kw}
  return None


def initialize(**kwargs) -> str | None:
  """`jax.distributed.initialize` with fszjax's conventions; returns the mode or None.

  Must run before anything touches a JAX backend. Multi-process CPU jobs use gloo
  collectives (a one-process job none). A failed one-process local start (e.g. a port
  race) is logged and the run goes on without the preemption service; any other failure
  raises.
  """

  mode = kwargs.pop("mode", "explicit")
  if jax.distributed.is_initialized():
    return _STATE["mode"]
  try:
    if kwargs.get("num_processes") == 1:
      # One process needs no cross-process collectives; with gloo, even the collectives
      # between its own CPU devices would go through TCP.
      jax.config.update("jax_cpu_collectives_implementation", None)
    elif jax.config.jax_cpu_collectives_implementation is None:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception:  # pylint: disable=broad-except  (option renamed or removed)
    pass
  timeout = kwargs.get("heartbeat_timeout_seconds")
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except
    if mode != "local":
      raise
    try:
      jax.distributed.shutdown()
    except Exception:  # pylint: disable=broad-except
      pass
    log.warning("could not start the local distributed runtime (%s); SIGTERM will not save "
                "a checkpoint", str(e).splitlines()[0][:160] if str(e) else type(e).__name__)
    return None
  state = _global_state()
  _STATE.update(mode=mode, process_id=int(state.process_id),
                num_processes=int(state.num_processes), timeout=timeout)
  return mode


def _global_state():
  from jax._src import distributed as jax_distributed  # noqa: PLC0415  (no public accessor)

  return jax_distributed.global_state


def initialize_from_args(args) -> str | None:
  """Initialises the distributed runtime from the CLI flags (see `plan`). Idempotent.

  Bad flags end the program with a one-line error (this runs before the CLI's own
  error handling).
  """
  try:
    p = plan(args)
  except MultihostError as e:
    print(f"fszjax: error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  if p is None:
    return None
  mode = initialize(**p)
  if mode is not None and _STATE["num_processes"] > 1 and not is_main():
    # Only process 0 reports progress; the others keep warnings and errors.
    logging.getLogger("fszjax").setLevel(logging.WARNING)
  return mode


# ----------------------------------------------------------------------------- helpers


def process_index() -> int:
  """This process's index; read from the distributed runtime when there is one (no backend
  is started then)."""

  if jax.distributed.is_initialized():
    return int(_global_state().process_id)
  return int(jax.process_index())


def process_count() -> int:
  if jax.distributed.is_initialized():
    return int(_global_state().num_processes)
  return int(jax.process_count())


def is_main() -> bool:
  """True on process 0: the one that logs, writes metrics, plots and summaries."""
  return process_index() == 0


def sync(name: str, timeout_s: int | None = None) -> None:
  """Barrier: returns once every process has called ``sync(name)`` (no-op when alone).

  Repeated calls with the same name are distinct barriers (a counter is appended), so
  every process must make the same sequence of calls.
  """
  if process_count() <= 1:
    return
  n = next(_BARRIER_COUNTS.setdefault(name, itertools.count()))
  key = f"fszjax:{name}:{n}"
  client = _global_state().client
  if client is not None and hasattr(client, "wait_at_barrier"):
    t = timeout_s or max(int(_STATE["timeout"] or 0) * 4, 600)
    client.wait_at_barrier(key, int(t * 1000))
    return

  multihost_utils.sync_global_devices(key)


def describe() -> str:
  """One line about the job, e.g. for logs: processes, devices, mode."""

  mode = _STATE["mode"] or "no distributed runtime"
  return (f"process {process_index()}/{process_count()} ({mode}), "
          f"{jax.local_device_count()} local / {jax.device_count()} global devices "
          f"({jax.default_backend()})")


def shutdown() -> None:
  """Leaves the distributed runtime (JAX also does this at exit)."""

  if jax.distributed.is_initialized():
    jax.distributed.shutdown()
  _STATE.update(mode=None, process_id=0, num_processes=1, timeout=None)


__all__: Sequence[str] = (
    "add_flags", "initialize_from_args", "initialize", "plan", "detect_cluster", "is_main",
    "sync", "process_index", "process_count", "describe", "shutdown", "free_port",
    "MultihostError")
