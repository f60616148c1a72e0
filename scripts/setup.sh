#!/usr/bin/env bash
# Create .venv and install the project with its pinned dependencies (PyPI only).
#   bash scripts/setup.sh         # what the main job, the demo and the evaluations need (requirements.txt;
#                                 # what scripts/quickstart.sh runs)
#   bash scripts/setup.sh --dev   # and the development set: pytest, ruff, lmms-eval, Playwright, VESL's Ray
#                                 # (requirements-dev.txt; what the tests need)
# Into a new venv the first took 125 s and the second 182 s on a busy 2-core machine (docs/benchmarks.md,
# "thirteenth round").
set -euo pipefail
cd "$(dirname "$0")/.."
REQUIREMENTS=requirements.txt
for arg in "$@"; do
  case "$arg" in
    --dev) REQUIREMENTS=requirements-dev.txt ;;
    *) echo "usage: bash scripts/setup.sh [--dev]" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  bash scripts/require_disk.sh 9 "the project venv (.venv, ~6 GiB installed, ~7.5 GiB with --dev)"
  "$PYTHON" -m venv .venv
fi
# --no-compile: no byte-compiling of every installed module up front (about 50 of 145 seconds here; Python compiles
# what it imports on first use)
.venv/bin/python -m pip install --quiet --no-compile -r "$REQUIREMENTS"
.venv/bin/python -m pip install --quiet --no-compile --no-deps -e .
.venv/bin/python -m pip check
