#!/usr/bin/env bash
# Runs one fszjax command as a multi-process JAX job on this machine: N processes, each with
# M simulated CPU devices, joined by jax.distributed on 127.0.0.1 (gloo collectives). It is
# the local stand-in for a TPU pod or a GPU cluster, and what the multi-host tests use.
#
#   launch/multiprocess_cpu.sh N M -- fszjax pretrain --config configs/glyphs.py --workdir runs/mp
#   launch/multiprocess_cpu.sh 2 4 -- python -m fszjax.cli eval --workdir runs/mp
#
# Each process gets FSZJAX_COORDINATOR, FSZJAX_NUM_PROCESSES, FSZJAX_PROCESS_ID and
# FSZJAX_CPU_DEVICES (read by the fszjax CLI as its global flags) plus JAX_PLATFORMS=cpu.
#
# Environment:
#   FSZJAX_PORT          coordinator port (default: a free port)
#   FSZJAX_DIST_TIMEOUT  seconds before a dead process fails the job (passed through; default 60)
#   FSZJAX_LOG_DIR       if set, process i writes its output to DIR/process_i.log and its pid
#                        to DIR/process_i.pid; otherwise all processes share this terminal
#   FSZJAX_KILL_GRACE    seconds the other processes get after one fails, before SIGKILL (10)
#   PYTHON               interpreter used to find a free port (default: python3)
#
# Signals: SIGTERM/SIGINT to this script are forwarded to every process; a SIGTERM makes
# fszjax pretrain save a checkpoint at a step all processes agree on and exit 0 (rerun
# the same command to resume). The exit status is 0 when every process exits 0, else
# that of the first process that failed (the others are then stopped).
set -uo pipefail

usage() {
  echo "usage: $0 NUM_PROCESSES CPU_DEVICES_PER_PROCESS -- COMMAND [ARGS...]" >&2
  exit 2
}

[[ $# -ge 3 ]] || usage
num_processes=$1
cpu_devices=$2
shift 2
[[ "$1" == "--" ]] && shift
[[ $# -ge 1 ]] || usage
if ! [[ "$num_processes" =~ ^[1-9][0-9]*$ && "$cpu_devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: NUM_PROCESSES and CPU_DEVICES_PER_PROCESS must be positive integers" >&2
  usage
fi

python=${PYTHON:-python3}
port=${FSZJAX_PORT:-}
if [[ -z "$port" ]]; then
  port=$("$python" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])') || { echo "$0: cannot pick a free port (set FSZJAX_PORT)" >&2; exit 2; }
fi
log_dir=${FSZJAX_LOG_DIR:-}
if [[ -n "$log_dir" ]]; then
  mkdir -p "$log_dir"
fi
grace=${FSZJAX_KILL_GRACE:-10}

pids=()
forward() {
  local sig=$1 p
  for p in "${pids[@]}"; do
    kill -s "$sig" "$p" 2>/dev/null || true
  done
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward KILL' EXIT

for ((i = 0; i < num_processes; i++)); do
  env_vars=(
    "FSZJAX_COORDINATOR=127.0.0.1:$port"
    "FSZJAX_NUM_PROCESSES=$num_processes"
    "FSZJAX_PROCESS_ID=$i"
    "FSZJAX_CPU_DEVICES=$cpu_devices"
    "FSZJAX_DIST_TIMEOUT=${FSZJAX_DIST_TIMEOUT:-60}"
    "JAX_PLATFORMS=cpu"
    "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo"
  )
  if [[ -n "$log_dir" ]]; then
    env "${env_vars[@]}" "$@" >"$log_dir/process_$i.log" 2>&1 &
    echo $! >"$log_dir/process_$i.pid"
  else
    env "${env_vars[@]}" "$@" &
  fi
  pids+=("$!")
done
echo "multiprocess_cpu: $num_processes processes x $cpu_devices CPU devices," \
  "coordinator 127.0.0.1:$port, pids ${pids[*]}" >&2

status=0
failed_at=""
finished=()
while :; do
  running=0
  for i in "${!pids[@]}"; do
    [[ -n "${finished[$i]:-}" ]] && continue
    p=${pids[$i]}
    if kill -0 "$p" 2>/dev/null; then
      running=1
      continue
    fi
    wait "$p"
    rc=$?
    finished[i]=1
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "multiprocess_cpu: process $i (pid $p) exited with status $rc; stopping the others" >&2
      forward TERM
      failed_at=$SECONDS
    fi
  done
  ((running)) || break
  if [[ -n "$failed_at" ]] && ((SECONDS - failed_at >= grace)); then
    forward KILL
  fi
  sleep 0.2
done
trap - EXIT
exit "$status"
