#!/usr/bin/env bash
# Create .venv and install the project with its pinned dependencies (PyPI only; ~2.5 minutes on a fresh machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  bash scripts/require_disk.sh 9 "the project venv (.venv, ~7.5 GiB installed)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -r requirements-dev.txt
.venv/bin/python -m pip install --quiet --no-deps -e .
.venv/bin/python -m pip check
