#!/usr/bin/env bash
# The GPU check: `bash bench/gpu_check.sh [--dry-run] [--out DIR] [--only STEPS] [--budget SECONDS]`.
# Runs the CUDA tests and the CUDA benchmarks of bench/gpu_check.py (its docstring lists the steps),
# each under its own time limit, the whole run under a hard limit of 8 minutes; writes
# DIR/gpu_check.json and DIR/gpu_check.md (default DIR: gpu-check), rewritten after every step.
#
# Python: $PYTHON if set, else .venv/bin/python, else python3; without --dry-run, the first of them
# whose torch sees CUDA. Installs nothing beyond the project's own extras, and only when the chosen
# Python lacks them: then `pip install -e '.[test,bench]'` into .venv, created with
# --system-site-packages so that an installed CUDA build of torch is kept, not downloaded again.
# Without CUDA (or with --dry-run) every GPU step is skipped after its imports are checked: seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
HARD_LIMIT_S=480  # 8 minutes; gpu_check.py's own --budget (450 s by default) ends the steps before it

dry_run=0
for argument in "$@"; do
  [ "$argument" = "--dry-run" ] && dry_run=1
done

candidates=()
[ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
[ -x .venv/bin/python ] && candidates+=(.venv/bin/python)
command -v python3 >/dev/null && candidates+=(python3)
if [ "${#candidates[@]}" -eq 0 ]; then
  echo "gpu_check.sh: no Python found (set PYTHON, or install python3)" >&2
  exit 2
fi

python="${candidates[0]}"
if [ "$dry_run" -eq 0 ] && { command -v nvidia-smi >/dev/null || [ -e /dev/nvidia0 ]; }; then
  # An NVIDIA machine: prefer a Python whose torch sees the GPU (a CPU-only .venv would dry-run).
  for candidate in "${candidates[@]}"; do
    if "$candidate" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
      python="$candidate"
      break
    fi
  done
fi

# Looked up, not imported (importing torch takes seconds): the dependencies and the test extra.
needs='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("torch", "numpy", "tqdm", "matplotlib", "pytest")))'
if ! "$python" -c "$needs" 2>/dev/null; then
  echo "gpu_check.sh: $python lacks the project's test dependencies; installing .[test,bench] into .venv" >&2
  if [ ! -x .venv/bin/python ]; then
    "$python" -m venv --system-site-packages .venv
  fi
  .venv/bin/python -m pip install --quiet -e ".[test,bench]"
  python=.venv/bin/python
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # posemb from this checkout, installed or not
export PYTHONUNBUFFERED=1
echo "gpu_check.sh: $("$python" -c 'import sys; print(sys.executable)') (hard limit ${HARD_LIMIT_S} s)"
exec timeout --signal=TERM --kill-after=15 "$HARD_LIMIT_S" "$python" bench/gpu_check.py "$@"
