#!/usr/bin/env bash
# Sets up the virtualenv (if needed, with the versions of launch/constraints.txt) and runs the
# test suite on CPU with 8 simulated devices.
#   launch/test.sh [pytest args...]
# Environment: FSZJAX_VENV (default .venv), PYTHON (default python3), FSZJAX_TEST_WORKERS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FSZJAX_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.fszjax-installed-test"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" || launch/constraints.txt -nt "$stamp" ]]; then
  # The tested versions (launch/constraints.txt); pip's output goes to a file.
  echo "== install fszjax[test,interop] into $VENV (pip output: $VENV/install.log)"
  if ! { "$VENV/bin/python" -m pip install --upgrade pip &&
         "$VENV/bin/python" -m pip install --progress-bar off -c launch/constraints.txt \
           -e ".[test,interop]"; } >"$VENV/install.log" 2>&1; then
    tail -n 20 "$VENV/install.log" >&2
    echo "install failed; the whole pip output is in $VENV/install.log" >&2
    exit 1
  fi
  touch "$stamp"
fi
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=3
workers=${FSZJAX_TEST_WORKERS:-2}
args=()
if [[ "$workers" != "0" ]]; then args+=(-n "$workers"); fi
exec "$VENV/bin/python" -m pytest "${args[@]}" "$@"
