#!/usr/bin/env bash
# One prepared GPU check (issue 18): kernel parity tests, kernel benchmark, torch backend on CUDA.
# Usage: scripts/gpu_check.sh OUT_DIR [--cpu-smoke]     (writes OUT_DIR/gpu_check.json and .md)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$repo/benchmarks/gpu_check.py" "$@"
