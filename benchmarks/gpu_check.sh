#!/usr/bin/env bash
# Every CUDA path of the pipeline, run and measured in at most about 5 minutes (benchmarks/gpu_check.py
# says what it prints). On a machine without CUDA it says so in one line and exits 0.
#   bash benchmarks/gpu_check.sh [--steps 30] [--skip-pipeline]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec timeout 420 "$PYTHON" benchmarks/gpu_check.py "$@"
