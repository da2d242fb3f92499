#!/usr/bin/env bash
# The GPU check: `bash bench/gpu_check.sh [--dry-run] [--out DIR]` (default DIR: gpu-check).
# Runs the CUDA tests and the CUDA benchmarks of bench/gpu_check.py, each step under its own time
# limit, the whole run under 8 minutes; writes DIR/gpu_check.json and DIR/gpu_check.md.
# Installs nothing beyond the project's own extras: it uses .venv when it exists (make setup),
# otherwise it creates it with the `test` extra. Without CUDA (or with --dry-run) every GPU step
# is skipped after its imports are checked: seconds, and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test]"
fi
exec timeout --signal=TERM --kill-after=20 480 .venv/bin/python bench/gpu_check.py "$@"
