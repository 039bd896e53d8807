#!/usr/bin/env bash
# fszjax on a Cloud TPU VM slice (a TPU pod): every worker runs the same command and
# jax.distributed finds the others by itself (fszjax/multihost.py).
#
#   launch/tpu_pod.sh create                # queued resource -> TPU VM slice (reused if it exists)
#   launch/tpu_pod.sh install               # this checkout -> every worker (venv, .[tpu])
#   launch/tpu_pod.sh run pretrain --config configs/siglip_b16.py --workdir gs://BUCKET/runs/b16
#   launch/tpu_pod.sh run adapt --config configs/glyphs.py --workdir gs://BUCKET/runs/adapt
#   launch/tpu_pod.sh ssh 'nvidia-smi || ls /dev/accel*'   # any shell command on the workers
#   launch/tpu_pod.sh logs                  # last lines of the detached run's log (worker 0)
#   launch/tpu_pod.sh status | delete       # state of the slice | teardown (slice and request)
#   launch/tpu_pod.sh up pretrain ...       # create + install + run; KEEP=0 also deletes at the end
#   launch/tpu_pod.sh compile --config C    # only the pre-flight check below, on this machine
#
# Pre-flight: before `run pretrain` or `up pretrain` starts anything, this machine compiles
# the train step for ACCELERATOR_TYPE with `fszjax compile` (libtpu, no TPU needed: install
# this checkout with `pip install -e ".[tpu]"` here) and stops if it does not fit in HBM,
# printing the fix. It takes minutes; skip it with --no-preflight after the action
# (`launch/tpu_pod.sh up --no-preflight pretrain ...`) or PREFLIGHT=0.
#
# gs:// paths (in the command and in TFDS_DATA_DIR) are mounted with Cloud Storage FUSE on
# every worker under /gcs/BUCKET and rewritten to that path, so checkpoints, metrics and
# data are shared by all workers as Orbax and the input pipeline expect. Preemption: a spot
# slice gets SIGTERM, all workers save a checkpoint at the same step and exit 0; run the
# same `up` (or `create`, `install`, `run`) again to resume from the workdir.
#
# Variables (environment):
#   TPU_NAME          name of the TPU VM slice (required)
#   ZONE              e.g. us-central2-b (required)
#   PROJECT           Google Cloud project (default: gcloud's configured one)
#   ACCELERATOR_TYPE  slice type (default v5litepod-16: 4 workers x 4 chips)
#   RUNTIME_VERSION   TPU VM image (default v2-alpha-tpuv5-lite; v4: tpu-ubuntu2204-base,
#                     v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
#   QR_NAME           queued-resource name (default TPU_NAME-qr)
#   SPOT              1 = spot capacity (preemptible), 0 = on-demand (default 0)
#   CREATE_FLAGS      extra flags for `queued-resources create`, e.g. "--reserved --network=my-net"
#   TFDS_DATA_DIR     prepared datasets on the workers (gs://BUCKET/tensorflow_datasets or a
#                     path on the workers' disks)
#   PYTHON_VERSION    Python of the workers' venv, installed by uv (default 3.12)
#   UV_VERSION        uv, installed from PyPI with pip by name and pinned version (default 0.13.9);
#                     nothing is piped from the network into a shell
#   REMOTE_DIR        where the checkout goes on the workers (default fszjax)
#   WORKER            workers to run on: all (default) or an index, e.g. 0 for `run prepare`
#   DETACH            1 = run under nohup, log to ~/fszjax-logs/run.log (see `logs`); default 0
#   KEEP              `up` only: 0 = delete the slice when the command ends (default 1)
#   FSZJAX_DIST_TIMEOUT  optional: jax.distributed heartbeat/init timeout in seconds
#   PREFLIGHT         0 = skip the pre-flight compile (default 1)
#   FSZJAX            the local fszjax command for the pre-flight (default: fszjax)
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 2
}

[[ $# -ge 1 ]] || usage
action=$1
shift
case "$action" in
  -h | --help | help) usage ;;
esac
PREFLIGHT=${PREFLIGHT:-1}
if [[ "${1:-}" == "--no-preflight" ]]; then
  PREFLIGHT=0
  shift
fi

if [[ "$action" != compile ]]; then
  : "${TPU_NAME:?set TPU_NAME (the TPU VM slice name)}"
  : "${ZONE:?set ZONE (e.g. us-central2-b)}"
fi
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-16}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
QR_NAME=${QR_NAME:-${TPU_NAME:-}-qr}
SPOT=${SPOT:-0}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
UV_VERSION=${UV_VERSION:-0.13.9}
REMOTE_DIR=${REMOTE_DIR:-fszjax}
WORKER=${WORKER:-all}
DETACH=${DETACH:-0}
KEEP=${KEEP:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

gflags=(--zone="${ZONE:-}")
if [[ -n "${PROJECT:-}" ]]; then
  gflags+=(--project="$PROJECT")
fi

log() { echo "tpu_pod: $*" >&2; }

tpu_exists() {
  gcloud compute tpus tpu-vm describe "$TPU_NAME" "${gflags[@]}" --format='value(state)' \
    >/dev/null 2>&1
}

qr_state() {
  gcloud compute tpus queued-resources describe "$QR_NAME" "${gflags[@]}" \
    --format='value(state.state)' 2>/dev/null || true
}

# Runs a bash command on the workers ($WORKER).
on_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gflags[@]}" --worker="$WORKER" \
    --command="bash -lc $(printf '%q' "$1")"
}

cmd_create() {
  if tpu_exists; then
    log "reusing the existing TPU VM $TPU_NAME"
    return
  fi
  local extra=()
  if [[ "$SPOT" == "1" ]]; then
    extra+=(--spot)
  fi
  if [[ -n "${CREATE_FLAGS:-}" ]]; then
    read -r -a more <<<"$CREATE_FLAGS"
    extra+=("${more[@]}")
  fi
  if [[ -z "$(qr_state)" ]]; then
    log "requesting $ACCELERATOR_TYPE ($RUNTIME_VERSION) as queued resource $QR_NAME"
    gcloud compute tpus queued-resources create "$QR_NAME" "${gflags[@]}" \
      --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
      --runtime-version="$RUNTIME_VERSION" "${extra[@]}"
  fi
  local state
  while :; do
    state=$(qr_state)
    case "$state" in
      ACTIVE) break ;;
      FAILED | SUSPENDED)
        log "queued resource $QR_NAME is $state; see: gcloud compute tpus queued-resources" \
          "describe $QR_NAME --zone=$ZONE"
        exit 1
        ;;
    esac
    log "queued resource $QR_NAME: ${state:-unknown}; waiting"
    sleep 30
  done
  log "TPU VM $TPU_NAME is ready"
}

cmd_install() {
  local tarball
  tarball=$(mktemp -t fszjax-src.XXXXXX.tar.gz)
  # Tracked and untracked-but-not-ignored files: what `git status` would commit.
  (cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -czf "$tarball" -T -)
  gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:fszjax-src.tar.gz" "${gflags[@]}" \
    --worker=all
  rm -f "$tarball"
  local setup
  setup=$(
    cat <<EOF
set -euo pipefail
rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/fszjax-src.tar.gz -C ~/$REMOTE_DIR
if ! command -v gcsfuse >/dev/null; then
  repo=gcsfuse-\$(lsb_release -c -s)
  key=/usr/share/keyrings/cloud.google.asc
  echo "deb [signed-by=\$key] https://packages.cloud.google.com/apt \$repo main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee \$key >/dev/null
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
fi
# uv from PyPI by name and pinned version (no remote install script); the Pythons it
# fetches are checked against the hashes built into that uv release.
if ! ~/.local/bin/uv --version 2>/dev/null | grep -qx "uv $UV_VERSION.*"; then
  python3 -m pip --version >/dev/null 2>&1 || sudo apt-get install -y -qq python3-pip
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user --disable-pip-version-check \
    "uv==$UV_VERSION"
fi
~/.local/bin/uv venv -q --allow-existing --python $PYTHON_VERSION ~/fszjax-venv
# fszjax and its dependencies from PyPI by name, pinned to the versions CI tests.
~/.local/bin/uv pip install -q --python ~/fszjax-venv/bin/python \
  -c ~/$REMOTE_DIR/launch/constraints-tpu.txt -e ~/$REMOTE_DIR"[tpu]"
~/fszjax-venv/bin/python -c "import fszjax, jax; print(jax.__version__)"
EOF
  )
  WORKER=all on_workers "$setup"
}

# gs://BUCKET/path (or --flag=gs://BUCKET/path) -> /gcs/BUCKET/path in $rewritten; the
# bucket is remembered in $buckets to be mounted.
declare -A buckets=()
rewritten=""
rewrite() {
  local a=$1 flag="" rest
  if [[ "$a" == --*=gs://* ]]; then
    flag=${a%%=*}=
    a=${a#*=}
  fi
  if [[ "$a" == gs://* ]]; then
    rest=${a#gs://}
    buckets[${rest%%/*}]=1
    a=/gcs/$rest
  fi
  rewritten=$flag$a
}

cmd_run() {
  [[ $# -ge 1 ]] || usage
  local args=() a
  for a in "$@"; do
    rewrite "$a"
    args+=("$rewritten")
  done
  local data_dir=${TFDS_DATA_DIR:-}
  if [[ -n "$data_dir" ]]; then
    rewrite "$data_dir"
    data_dir=$rewritten
  fi
  local script="set -euo pipefail"$'\n'
  local b
  for b in "${!buckets[@]}"; do
    # --rename-dir-limit: Orbax renames a finished checkpoint's temporary directory.
    script+="if ! mountpoint -q /gcs/$b; then sudo mkdir -p /gcs/$b && sudo chown \$USER /gcs/$b"
    script+=" && gcsfuse --implicit-dirs --rename-dir-limit=200000 $b /gcs/$b; fi"$'\n'
  done
  script+="cd ~/$REMOTE_DIR && source ~/fszjax-venv/bin/activate"$'\n'
  if [[ -n "$data_dir" ]]; then
    script+="export TFDS_DATA_DIR=$(printf '%q' "$data_dir")"$'\n'
  fi
  if [[ -n "${FSZJAX_DIST_TIMEOUT:-}" ]]; then
    script+="export FSZJAX_DIST_TIMEOUT=$(printf '%q' "$FSZJAX_DIST_TIMEOUT")"$'\n'
  fi
  local cmd
  cmd="fszjax $(printf '%q ' "${args[@]}")"
  if [[ "$DETACH" == "1" ]]; then
    script+="mkdir -p ~/fszjax-logs && nohup $cmd >~/fszjax-logs/run.log 2>&1 </dev/null &"$'\n'
    script+="echo \"worker \$(hostname): started, log ~/fszjax-logs/run.log\""
  else
    script+="exec $cmd"
  fi
  log "on workers $WORKER of $TPU_NAME: $cmd"
  on_workers "$script"
}

# Pre-flight: compiles the train step of `pretrain ARGS` for $ACCELERATOR_TYPE on this
# machine (`fszjax compile`) and exits 1 when it does not fit. Other commands pass.
preflight() {
  if [[ "$PREFLIGHT" == "0" || "${1:-}" != "pretrain" ]]; then
    return 0
  fi
  shift
  local fszjax=${FSZJAX:-fszjax} args=() a want=""
  for a in "$@"; do
    if [[ -n "$want" ]]; then
      args+=("$a")
      want=""
    elif [[ "$a" == --config || "$a" == --config.* ]]; then
      args+=("$a")
      if [[ "$a" != *=* ]]; then want=1; fi
    fi
  done
  if ! command -v "$fszjax" >/dev/null; then
    log "pre-flight: no local '$fszjax' command; pip install -e \"${ROOT}[tpu]\" here, set FSZJAX," \
      "or skip the check with --no-preflight"
    exit 1
  fi
  log "pre-flight: compiling the train step for $ACCELERATOR_TYPE on this machine" \
    "(minutes; --no-preflight skips)"
  local rc=0
  (cd "$ROOT" && JAX_PLATFORMS=cpu "$fszjax" compile --topology "$ACCELERATOR_TYPE" \
    "${args[@]}" >/dev/null) || rc=$?
  if [[ $rc -eq 1 ]]; then
    log "pre-flight: the train step does not fit $ACCELERATOR_TYPE (the fix is printed above);" \
      "nothing was started"
    exit 1
  elif [[ $rc -ne 0 ]]; then
    log "pre-flight: fszjax compile failed (exit $rc); nothing was started (--no-preflight skips)"
    exit 1
  fi
  log "pre-flight: fits"
}

cmd_delete() {
  if [[ -n "$(qr_state)" ]]; then
    log "deleting queued resource $QR_NAME and its TPU VM"
    gcloud compute tpus queued-resources delete "$QR_NAME" "${gflags[@]}" --force --quiet
  elif tpu_exists; then
    log "deleting TPU VM $TPU_NAME"
    gcloud compute tpus tpu-vm delete "$TPU_NAME" "${gflags[@]}" --quiet
  else
    log "nothing to delete"
  fi
}

case "$action" in
  create) cmd_create ;;
  install) cmd_install ;;
  run)
    preflight "$@"
    cmd_run "$@"
    ;;
  compile) PREFLIGHT=1 preflight pretrain "$@" ;;
  ssh) [[ $# -ge 1 ]] || usage; on_workers "$*" ;;
  logs) WORKER=${WORKER/all/0} on_workers "tail -n ${LINES:-50} ~/fszjax-logs/run.log" ;;
  status)
    echo "queued resource $QR_NAME: $(qr_state)"
    gcloud compute tpus tpu-vm describe "$TPU_NAME" "${gflags[@]}" \
      --format='table(name,state,acceleratorType,health)' || true
    ;;
  delete) cmd_delete ;;
  up)
    if [[ "$KEEP" == "0" ]]; then
      trap cmd_delete EXIT
    fi
    preflight "$@"
    cmd_create
    cmd_install
    cmd_run "$@"
    ;;
  *)
    log "unknown action $action"
    usage
    ;;
esac
