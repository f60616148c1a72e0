#!/usr/bin/env bash
# The main job on the embedded default (no downloads beyond PyPI): set up, generate the synthetic world, pretrain a
# tiny CLOC encoder on it, train a CLOC-LLaVA on that encoder (stage 1, then stage 2 in two phases: grounding
# questions alone, then the mixed conversations), and print held-out grounding and referring accuracy.
#   bash scripts/quickstart.sh          # default run: stage 2 = 1000 grounding + 400 mixed steps (about 19
#                                       # minutes on this project's 2-core machine, setup included)
#   bash scripts/quickstart.sh --long   # stage 2 = 3600 grounding + 800 mixed steps; after a default run it
#                                       # continues that run's grounding phase from step 1000, then redoes the mixed one
#                                       # (25-30 more minutes)
# Times and held-out grounding: README.md and docs/benchmarks.md ("twelfth" and "fourteenth round").
# Step counts can be set one by one: CLOC_STEPS=... STAGE1_STEPS=... GROUNDING_STEPS=... STAGE2_STEPS=... bash
# scripts/quickstart.sh; RUNS=DIR puts the world and the runs under DIR instead of runs/.
# Re-running continues each stage from its last checkpoint; a stage whose input changed (a longer CLOC run, say)
# starts over. The final model is runs/mllm_tiny_stage2, what `python -m eval regions` and the demo use by default.
set -euo pipefail
cd "$(dirname "$0")/.."

LONG=0
for arg in "$@"; do
    case "$arg" in
        --long) LONG=1 ;;
        *) echo "usage: bash scripts/quickstart.sh [--long]" >&2; exit 2 ;;
    esac
done
CLOC_STEPS=${CLOC_STEPS:-450} STAGE1_STEPS=${STAGE1_STEPS:-100}
if [ "$LONG" = 1 ]; then
    GROUNDING_STEPS=${GROUNDING_STEPS:-3600} STAGE2_STEPS=${STAGE2_STEPS:-800}
else
    GROUNDING_STEPS=${GROUNDING_STEPS:-1000} STAGE2_STEPS=${STAGE2_STEPS:-400}
fi
PY=.venv/bin/python
RUNS=${RUNS:-runs}
WORLD=$RUNS/world
MLLM_DATA=$RUNS/world_mllm
CLOC=$RUNS/cloc_tiny
STAGE1=$RUNS/mllm_tiny_stage1
GROUNDING=$RUNS/mllm_tiny_stage2_grounding
STAGE2=$RUNS/mllm_tiny_stage2

# resume_flag DIR: "--resume" when DIR holds a checkpoint to continue from.
resume_flag() { if [ -f "$1/latest" ]; then echo --resume; fi; }
# start_stage DIR INPUTS: DIR starts over when what it was trained from (INPUTS) changed since its last run.
start_stage() {
    if [ -d "$1" ] && [ "$(cat "$1/inputs" 2>/dev/null)" != "$2" ]; then
        echo "$1: its inputs changed ($2); training it again"
        rm -rf "$1"
    fi
    mkdir -p "$1"
    echo "$2" > "$1/inputs"
}
latest() { echo "$1/$(cat "$1/latest")"; }
# The recipe's fingerprint: a run trained with other configs, data or tokenizer starts over instead of resuming.
RECIPE=$(cat train/configs/mllm_tiny_stage1.yaml train/configs/mllm_tiny_stage2_grounding.yaml \
    train/configs/mllm_tiny_stage2.yaml train/mllm/synthetic_data.py train/mllm/build.py mllm/tokenization.py \
    | sha256sum | cut -c1-16)

bash scripts/setup.sh
$PY -m cloc_encoder.data.synthetic --out "$WORLD" --train 2000 --val 200 --test 200

echo "== 1/5 CLOC pretraining ($CLOC_STEPS steps)"
$PY -m train.cloc_pretrain --config train/configs/cloc_tiny.yaml $(resume_flag "$CLOC") \
    train_data="$WORLD/train.jsonl" output_dir="$CLOC" max_steps="$CLOC_STEPS" val_data="$WORLD/val.jsonl"
$PY -m eval encoder --model "$CLOC" --data "$WORLD/test.jsonl" --out "$(latest "$CLOC")/eval_test" --no-progress

echo "== 2/5 MLLM stage 1: projectors ($STAGE1_STEPS steps)"
# The MLLM's own training scenes (1-3 objects, 20,000 images, its own seed) and their conversations
# (train/mllm/synthetic_data.py: train_conv.json, mixed; grounding_conv.json, grounding alone); the encoder world's
# test split stays held out.
$PY -m train.mllm.synthetic_data --out "$MLLM_DATA"
start_stage "$STAGE1" "$(latest "$CLOC") recipe $RECIPE"
$PY -m train.mllm_train --config train/configs/mllm_tiny_stage1.yaml $(resume_flag "$STAGE1") \
    train_data="$MLLM_DATA/train_conv.json" vision_tower="$CLOC" output_dir="$STAGE1" max_steps="$STAGE1_STEPS"

echo "== 3/5 MLLM stage 2, grounding phase: LLM + projectors on grounding questions ($GROUNDING_STEPS steps)"
start_stage "$GROUNDING" "$(latest "$CLOC") $(latest "$STAGE1") recipe $RECIPE"
$PY -m train.mllm_train --config train/configs/mllm_tiny_stage2_grounding.yaml $(resume_flag "$GROUNDING") \
    train_data="$MLLM_DATA/grounding_conv.json" vision_tower="$CLOC" \
    pretrain_mm_projector="$STAGE1/mm_projector.safetensors" output_dir="$GROUNDING" max_steps="$GROUNDING_STEPS"

echo "== 4/5 MLLM stage 2, mixed phase: grounding, referring, follow-ups, other wordings ($STAGE2_STEPS steps)"
start_stage "$STAGE2" "$(latest "$GROUNDING") recipe $RECIPE"
$PY -m train.mllm_train --config train/configs/mllm_tiny_stage2.yaml $(resume_flag "$STAGE2") \
    train_data="$MLLM_DATA/train_conv.json" model_path="$(latest "$GROUNDING")" output_dir="$STAGE2" \
    max_steps="$STAGE2_STEPS"

echo "== 5/5 held-out grounding and referring"
$PY -m eval regions --model "$STAGE2" --data "$WORLD/test.jsonl" --train-data "$MLLM_DATA/train.jsonl" \
    --out "$(latest "$STAGE2")/eval_test" --batch-size 32
echo "model: $(latest "$STAGE2")   metrics: $(latest "$STAGE2")/eval_test/metrics.json"
