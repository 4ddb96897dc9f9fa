#!/usr/bin/env bash
# The GPU path on a lent GPU, in under 5 minutes: one table (benchmarks/gpu_check.py says what is checked).
# Usage: bash benchmarks/gpu_check.sh [--device cpu]    (cpu: the same steps, to check the script without a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=python3
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PYTHONUNBUFFERED=1 timeout 300 "$PYTHON" -m benchmarks.gpu_check "$@"
