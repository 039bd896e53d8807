#!/usr/bin/env bash
# Sets up the virtualenv (if needed) and runs the test suite on CPU with 8 simulated devices.
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
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[test,interop]"
  touch "$stamp"
fi
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=3
workers=${FSZJAX_TEST_WORKERS:-2}
args=()
if [[ "$workers" != "0" ]]; then args+=(-n "$workers"); fi
exec "$VENV/bin/python" -m pytest "${args[@]}" "$@"
