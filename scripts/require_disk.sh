#!/usr/bin/env bash
# require_disk.sh GIB WHAT: fail with a clear message when the current folder's file system has less than GIB GiB
# free, before a pip install that would otherwise die halfway with "OSError: [Errno 28] No space left on device".
# Run by scripts/setup.sh and scripts/setup_vllm.sh only when they create a venv.
set -euo pipefail
need_gib=$1
what=$2
free_kib=$(df -Pk . | awk 'NR == 2 {print $4}')
free_gib=$((free_kib / 1024 / 1024))
if [ "$free_gib" -lt "$need_gib" ]; then
  echo "error: $what needs about $need_gib GiB free on $(df -P . | awk 'NR == 2 {print $6}'), only $free_gib GiB left;" \
    "free some space (old clones' .venv / .venv-vllm, /tmp) and rerun" >&2
  exit 1
fi
