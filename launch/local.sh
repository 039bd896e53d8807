#!/usr/bin/env bash
# The main job on the embedded Glyphs dataset, end to end on one machine (CPU is fine):
#   1. virtualenv + install (once)        4. few-shot adaptation + domain generalisation
#   2. prepare Glyphs (once)              5. Conv-4 MAML from scratch (reference)
#   3. pretrain + zero-shot evaluation    6. runs/<name>/report.md with figures
# Rerunning reuses what is prepared or trained and resumes interrupted stages (Ctrl-C
# saves a checkpoint first); --fresh starts over; --readme also writes the run's results
# table into README.md (off by default: a user's run leaves the README alone). The install
# output goes to $VENV/install.log, not to the terminal. Environment: FSZJAX_VENV (.venv),
# FSZJAX_RUN (runs/glyphs), FSZJAX_DATA (runs/data), PYTHON (python3), FSZJAX_CPU_ISA
# (AVX2: the x86-64 instruction set XLA compiles for; native = XLA's choice). Extra arguments go
# to every fszjax call (e.g. --cpu_devices 2).
set -euo pipefail
cd "$(dirname "$0")/.."
FRESH=0
README=0
EXTRA=()
for a in "$@"; do
  case "$a" in
    --fresh) FRESH=1 ;;
    --readme) README=1 ;;
    *) EXTRA+=("$a") ;;
  esac
done
VENV=${FSZJAX_VENV:-.venv}
RUN=${FSZJAX_RUN:-runs/glyphs}
DATA=${FSZJAX_DATA:-runs/data}
PY=${PYTHON:-python3}
stamp="$VENV/.fszjax-installed"
if [[ ! -x "$VENV/bin/python" ]]; then "$PY" -m venv "$VENV"; fi
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  echo "== 0/5 install fszjax into $VENV (pip output: $VENV/install.log)"
  t=$(date +%s)
  if ! { "$VENV/bin/python" -m pip install --upgrade pip &&
         "$VENV/bin/python" -m pip install --progress-bar off -e .; } >"$VENV/install.log" 2>&1; then
    tail -n 20 "$VENV/install.log" >&2
    echo "install failed; the whole pip output is in $VENV/install.log" >&2
    exit 1
  fi
  touch "$stamp"
  echo "   installed in $(( $(date +%s) - t )) s"
fi
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
# XLA compiles for the CPU it runs on, and the same program built with AVX-512 and with
# AVX2 rounds differently (measured in BUILD_NOTES, "Reproducible runs"), so two machines of
# different CPU generations drift apart over a run. The main job pins the x86-64 ISA to
# AVX2, which every such machine has: FSZJAX_CPU_ISA=native leaves it to XLA.
ISA=${FSZJAX_CPU_ISA:-AVX2}
if [[ "$(uname -m)" == x86_64 && "$ISA" != native ]]; then
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_cpu_max_isa=$ISA"
fi
FSZ=("$VENV/bin/fszjax" "${EXTRA[@]+"${EXTRA[@]}"}")
if [[ $FRESH == 1 ]]; then rm -rf "$RUN"; fi
mkdir -p "$RUN"
start=$(date +%s)
# Ctrl-C: the running stage saves a checkpoint at its current step and exits 130, which
# stops this script (set -e); running it again continues from there.
on_exit() {
  local rc=$?
  if [[ $rc != 0 ]]; then
    echo "stopped (exit $rc): run launch/local.sh again to continue from the last checkpoint" >&2
  fi
}
trap on_exit EXIT
# Each stage ends with its wall time, also appended to $RUN/stage_times.tsv (the report's
# header shows the latest time of each stage).
stage_done() {
  local secs=$(( $(date +%s) - $2 ))
  echo "   $1: done in $(( secs / 60 )) min $(( secs % 60 )) s"
  printf '%s\t%s\n' "$1" "$secs" >> "$RUN/stage_times.tsv"
}

echo "== 1/5 prepare Glyphs -> $DATA"
t=$(date +%s)
"${FSZ[@]}" prepare glyphs --data_dir "$DATA"
stage_done prepare "$t"

echo "== 2/5 pretrain (configs/glyphs.py) -> $RUN/pretrain"
if [[ -f "$RUN/pretrain/summary.json" ]]; then
  echo "   done already (summary.json); --fresh to redo"
else  # resumes from the last checkpoint after an interruption
  t=$(date +%s)
  "${FSZ[@]}" pretrain --config configs/glyphs.py --workdir "$RUN/pretrain" \
    --config.data.data_dir="$DATA" --config.progress=False
  stage_done pretrain "$t"
fi

if [[ -f "$RUN/adapt/results.json" ]]; then
  echo "== 3/5 few-shot adaptation: done already ($RUN/adapt/results.json)"
elif [[ -f configs/glyphs_fewshot.py ]]; then
  echo "== 3/5 few-shot adaptation of the pretrained towers -> $RUN/adapt"
  t=$(date +%s)
  "${FSZ[@]}" adapt --config configs/glyphs_fewshot.py --workdir "$RUN/adapt" \
    --config.init_from="$RUN/pretrain" --config.data.data_dir="$DATA"
  stage_done adapt "$t"
fi
if [[ -f "$RUN/maml_conv4/results.json" ]]; then
  echo "== 4/5 Conv-4 MAML: done already ($RUN/maml_conv4/results.json)"
elif [[ -f configs/glyphs_maml_conv4.py ]]; then
  echo "== 4/5 Conv-4 MAML from scratch -> $RUN/maml_conv4"
  # Two simulated CPU devices share the evaluation episodes (1.3x faster on 2 cores; see
  # BUILD_NOTES) and the meta-batch, unless the caller chose --cpu_devices.
  DEV=(--cpu_devices 2)
  if [[ " ${EXTRA[*]-} " == *" --cpu_devices"* ]]; then DEV=(); fi
  t=$(date +%s)
  "${FSZ[@]}" "${DEV[@]+"${DEV[@]}"}" adapt --config configs/glyphs_maml_conv4.py \
    --workdir "$RUN/maml_conv4" --config.data.data_dir="$DATA"
  stage_done maml_conv4 "$t"
fi

REPORT=("$VENV/bin/python" -m fszjax.report --run "$RUN" --wall_time_s $(( $(date +%s) - start )))
if [[ $README == 1 ]]; then
  echo "== 5/5 report -> $RUN/report.md (+ the results table in README.md: --readme)"
  REPORT+=(--readme README.md)
else
  echo "== 5/5 report -> $RUN/report.md (README.md untouched; --readme writes its table)"
fi
"${REPORT[@]}"
echo
cat "$RUN/results_table.md" 2>/dev/null || true
echo
echo "report: $RUN/report.md"
