#!/usr/bin/env bash
# The main job on the embedded default: set up, generate the synthetic world, pretrain a tiny CLOC encoder on it,
# and print its held-out region metrics. Re-running continues from the last checkpoint.
#   STEPS=800 (default) training steps at batch 64 (about 6-10 minutes on 2 CPU cores); STEPS=2000 for a better run.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-800}
RUN=${RUN:-runs/cloc_tiny}
PY=.venv/bin/python

bash scripts/setup.sh
$PY -m cloc_encoder.data.synthetic --out runs/world --train 2000 --val 200 --test 200
RESUME=()
if [ -f "$RUN/latest" ]; then RESUME=(--resume); fi
$PY -m train.cloc_pretrain --config train/configs/cloc_tiny.yaml "${RESUME[@]}" \
    output_dir="$RUN" max_steps="$STEPS" val_data=runs/world/val.jsonl
CHECKPOINT="$RUN/$(cat "$RUN/latest")"
$PY -m eval encoder --model "$CHECKPOINT" --data runs/world/test.jsonl --out "$RUN/eval_test"
echo "model: $CHECKPOINT   metrics: $RUN/eval_test/metrics.json"
