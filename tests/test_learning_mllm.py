"""Learning test: a CLOC-LLaVA — the tiny CLOC encoder pretrained by the foundation pipeline (the ``pretrained_cloc``
fixture) and a tiny Llama from config, with an offline-trained tokenizer — trained with the shipped synthetic-world
recipe (``train/mllm/synthetic_data.py``; ``mllm_tiny_stage1.yaml``, then stage 2 in two phases:
``mllm_tiny_stage2_grounding.yaml`` on grounding questions alone, ``mllm_tiny_stage2.yaml`` on the mixed
conversations), answers held-out grounding and referring questions far better than the measured baselines.

The bars were fixed before this recipe was measured in the test (issue 12 §3): referring above 6x chance (12 colour
x shape categories); grounding Acc@0.5 at least 3 combined standard errors above the best constant box's,
3 * sqrt(p(1-p)/n + b(1-b)/n) over the same n = 480 held-out questions (tests/numerics.py); mean IoU 0.03 above
the constant box's. The quickstart's target (30% Acc@0.5, issue 12 §2) is not a bar here: this test trains two
thirds of the quickstart's stage-2 steps (800 + 400 against 1200 + 600; docs/benchmarks.md, eleventh round: this
test gave 29.2% with the rate held in both phases, before the mixed phase's decay was shipped). The recipe's
``precision: bf16_if_native`` makes the run bf16 on a CPU with bf16 units and fp32 elsewhere; the bars are the
same for both.
"""

from __future__ import annotations

import json

import pytest

from cloc_encoder.data.format import read_region_text
from eval.mllm_generation import GenerationSettings
from eval.regions.evaluate import evaluate_regions
from tests.numerics import combined_standard_error
from train.mllm.stages import train_stages
from train.mllm.synthetic_data import build_training_data

STAGE1_STEPS = 100
STAGE2_GROUNDING_STEPS = 800  # the quickstart's 1000 + 400, cut to a CI's time
STAGE2_STEPS = 400


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_tiny_cloc_llava_learns_to_ground_and_refer(pretrained_cloc, tmp_path):
    world = pretrained_cloc.world
    data = build_training_data(tmp_path / "world_mllm")
    train_records = read_region_text(data.conversations.parent / "train.jsonl")
    common = ["progress_bar=false", "tensorboard=false"]
    runs = train_stages(
        data.conversations,
        pretrained_cloc.result.checkpoint,
        tmp_path / "mllm",
        grounding_data=data.grounding,
        overrides=common,
        stage1_overrides=[f"max_steps={STAGE1_STEPS}"],
        stage2_grounding_overrides=[f"max_steps={STAGE2_GROUNDING_STEPS}"],
        stage2_overrides=[f"max_steps={STAGE2_STEPS}"],
    )
    steps = (runs.stage1.step, runs.stage2_grounding.step, runs.stage2.step)
    assert steps == (STAGE1_STEPS, STAGE2_GROUNDING_STEPS, STAGE2_STEPS)
    stage2 = runs.stage2

    metrics = evaluate_regions(
        stage2.inference_model(),
        stage2.processor,
        read_region_text(world / "test.jsonl"),
        tmp_path / "eval",
        settings=GenerationSettings(max_new_tokens=24, batch_size=32),
        train_records=train_records,
        progress=False,
    )
    grounding, referring = metrics["grounding"], metrics["referring"]
    baseline = max(b["acc@0.5"] for b in grounding["baselines"].values())
    print(
        json.dumps(
            {
                "minutes": round(runs.elapsed_s / 60, 2),
                "grounding_acc@0.5": grounding["acc@0.5"],
                "grounding_miou": grounding["miou"],
                "constant_box_acc@0.5": baseline,
                "referring_acc": referring["accuracy"],
                "referring_chance": referring["chance"],
                "questions": [grounding["num_questions"], referring["num_questions"]],
            },
            indent=1,
        )
    )
    # Referring: chance 8.3% (12 colour x shape categories).
    assert referring["accuracy"] > 6 * referring["chance"], referring
    # Grounding: bars fixed before the measurement (module docstring).
    accuracy, n = grounding["acc@0.5"], grounding["num_questions"]
    margin = 3 * combined_standard_error(accuracy, n, baseline, n)
    assert accuracy >= baseline + margin, (grounding, baseline, margin)
    assert grounding["miou"] > max(b["miou"] for b in grounding["baselines"].values()) + 0.03, grounding
    assert grounding["no_box"] < 0.05 * n  # answers are boxes
