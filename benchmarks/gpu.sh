#!/usr/bin/env bash
# Benchmarks on one NVIDIA GPU, in under 10 minutes: `fszjax bench pretrain` for SigLIP B/16
# in bf16 at several global batches, with cuDNN attention and without, remat none and dots,
# then `fszjax bench adapt` (Conv-4 MAML). One JSON file of results:
# $OUT/gpu_bench.json (or ./gpu_bench.json), the runs' logs in gpu_bench.log beside it.
#
#   benchmarks/gpu.sh                  # from the repository root or anywhere
#
# Made for a machine that may have JAX (with CUDA), flax, optax, orbax, chex and
# sentencepiece but not grain, tensorflow-datasets or ml-collections, and may be offline:
# fszjax itself is installed with --no-deps (or put on PYTHONPATH if pip cannot), and only
# the missing packages the benchmarks import are installed (ml-collections for the config
# files), from FSZJAX_WHEELS (a folder of wheels) when set, else from the package index.
#
# Variables (environment):
#   PYTHON        interpreter with JAX (default python3)
#   OUT           folder for the results (default: the current directory)
#   BUDGET_S      stop starting new runs after this many seconds (default 510)
#   RUN_TIMEOUT   seconds per run before it is killed (default 150)
#   STEPS         timed steps per pretrain run (default 8; the first compiles)
#   FSZJAX_WHEELS folder of wheels for offline installs (pip --no-index --find-links)
#   REQUIRE_GPU   0 = run without a GPU too (a dry run of this script on a CPU; default 1)
#   EXTRA_ARGS    extra arguments for every pretrain run, e.g. tiny-model overrides
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$PWD}
BUDGET_S=${BUDGET_S:-510}
RUN_TIMEOUT=${RUN_TIMEOUT:-150}
STEPS=${STEPS:-8}
mkdir -p "$OUTDIR"
RESULTS="$OUTDIR/gpu_bench.json"
LOG="$OUTDIR/gpu_bench.log"
RUNS=$(mktemp -t fszjax-gpu-runs.XXXXXX)
trap 'rm -f "$RUNS"' EXIT
: >"$LOG"
start=$(date +%s)

say() { echo "gpu.sh: $*" | tee -a "$LOG" >&2; }

# ---- the GPU and JAX
if [[ "${REQUIRE_GPU:-1}" != "0" ]] &&
  ! "$PY" -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else 1)' \
    >>"$LOG" 2>&1; then
  say "no GPU visible to JAX ($PY); install jax[cuda12] (pip install -e '.[gpu]') and retry"
  exit 1
fi
"$PY" -c 'import jax; d = jax.devices()[0]; print("jax", jax.__version__, "on", d.device_kind)' \
  | tee -a "$LOG" >&2

# ---- fszjax and the packages the benchmarks import
pip_args=(-q)
if [[ -n "${FSZJAX_WHEELS:-}" ]]; then
  pip_args+=(--no-index --find-links "$FSZJAX_WHEELS")
fi
if ! "$PY" -m pip install "${pip_args[@]}" --no-deps --no-build-isolation -e . >>"$LOG" 2>&1; then
  say "pip install -e . failed (offline?); using PYTHONPATH=$ROOT"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
missing=()
for pair in ml_collections:ml-collections flax:flax optax:optax numpy:numpy; do
  if ! "$PY" -c "import ${pair%%:*}" >/dev/null 2>&1; then
    missing+=("${pair#*:}")
  fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
  say "installing ${missing[*]}"
  if ! "$PY" -m pip install "${pip_args[@]}" "${missing[@]}" >>"$LOG" 2>&1; then
    say "could not install ${missing[*]} (offline? set FSZJAX_WHEELS to a folder of wheels)"
    exit 1
  fi
fi

# ---- the runs: each appends one JSON line (its result, or its error) to $RUNS
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export TF_CPP_MIN_LOG_LEVEL=3

run() { # run NAME fszjax-args...
  local name=$1
  shift
  local now=$(($(date +%s) - start))
  if ((now > BUDGET_S)); then
    say "$name: skipped (time budget of ${BUDGET_S}s spent)"
    printf '{"name": "%s", "skipped": "time budget"}\n' "$name" >>"$RUNS"
    return
  fi
  say "$name: fszjax $*"
  local out rc=0 errfile
  errfile=$(mktemp -t fszjax-gpu-err.XXXXXX)
  out=$(timeout "$RUN_TIMEOUT" "$PY" -m fszjax.cli "$@" 2>"$errfile") || rc=$?
  cat "$errfile" >>"$LOG"
  local line
  line=$(printf '%s\n' "$out" | grep '^{' | tail -n 1 || true)
  if [[ $rc -eq 0 && -n "$line" ]]; then
    "$PY" -c 'import json, sys; r = json.loads(sys.argv[2]); r["name"] = sys.argv[1]; print(json.dumps(r))' \
      "$name" "$line" >>"$RUNS"
    say "$name: ok"
  else
    local why="exit $rc"
    if [[ $rc -eq 124 ]]; then why="timed out after ${RUN_TIMEOUT}s"; fi
    local err
    err=$(grep -E 'RESOURCE_EXHAUSTED|Error|error' "$errfile" | tail -n 1 | cut -c1-300 || true)
    "$PY" -c 'import json, sys; print(json.dumps({"name": sys.argv[1], "error": sys.argv[2], "last_error_line": sys.argv[3]}))' \
      "$name" "$why" "$err" >>"$RUNS"
    say "$name: failed ($why)"
  fi
  rm -f "$errfile"
}

read -r -a extra <<<"${EXTRA_ARGS:-}"
B16=(bench pretrain --config configs/siglip_b16.py --steps "$STEPS" --config.model.dtype=bfloat16
  "${extra[@]}")
run b16_bs256_xla_none "${B16[@]}" --config.batch_size=256 --config.model.remat=none
run b16_bs256_cudnn_none "${B16[@]}" --config.batch_size=256 --config.model.remat=none \
  --config.model.attn_impl=cudnn
run b16_bs512_cudnn_none "${B16[@]}" --config.batch_size=512 --config.model.remat=none \
  --config.model.attn_impl=cudnn
run b16_bs512_cudnn_dots "${B16[@]}" --config.batch_size=512 --config.model.remat=dots \
  --config.model.attn_impl=cudnn
run b16_bs512_xla_none "${B16[@]}" --config.batch_size=512 --config.model.remat=none
run b16_bs1024_cudnn_dots "${B16[@]}" --config.batch_size=1024 --config.model.remat=dots \
  --config.model.attn_impl=cudnn
run adapt_conv4_maml bench adapt --config configs/glyphs_maml_conv4.py --steps 20

# ---- one JSON file
"$PY" - "$RUNS" "$RESULTS" "$(($(date +%s) - start))" <<'EOF'
import json, sys
import jax
runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
out = {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
       "wall_s": int(sys.argv[3]), "runs": runs}
with open(sys.argv[2], "w") as f:
  json.dump(out, f, indent=1)
for r in runs:
  if "mfu" in r:
    print(f"{r['name']:<24} {r['examples_per_sec']:9.1f} ex/s  step {r['step_time_s'] * 1e3:7.1f} ms"
          f"  MFU {r['mfu'] or 0:.1%}")
  else:
    print(f"{r['name']:<24} {r.get('error') or r.get('skipped') or json.dumps(r)[:100]}")
EOF
say "results: $RESULTS (log: $LOG)"
