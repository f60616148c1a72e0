#!/usr/bin/env bash
# Create .venv and install the project with its pinned dependencies (PyPI only; ~2 minutes on a fresh machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  bash scripts/require_disk.sh 9 "the project venv (.venv, ~7.5 GiB installed)"
  "$PYTHON" -m venv .venv
fi
# --no-compile: no byte-compiling of every installed module up front (about 50 of 145 seconds here; Python compiles
# what it imports on first use)
.venv/bin/python -m pip install --quiet --no-compile -r requirements-dev.txt
.venv/bin/python -m pip install --quiet --no-compile --no-deps -e .
.venv/bin/python -m pip check
