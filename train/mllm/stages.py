"""The synthetic-world recipe's MLLM stages in one call, from Python: stage 1 (projectors), then stage 2 in two
phases — grounding questions alone from stage 1's projector file (which carries any vision-tower parts stage 1
tuned), then the mixed conversations from that phase's checkpoint.

    from train.mllm.stages import train_stages
    from train.mllm.synthetic_data import build_training_data
    data = build_training_data("runs/world_mllm")
    runs = train_stages(data.conversations, "runs/cloc_tiny", "runs/mllm_tiny", grounding_data=data.grounding)

runs ``train/configs/mllm_tiny_stage1.yaml``, ``mllm_tiny_stage2_grounding.yaml`` and ``mllm_tiny_stage2.yaml`` into
``<out>/stage1``, ``<out>/stage2_grounding`` and ``<out>/stage2``; without ``grounding_data`` stage 2 is one phase
(``mllm_tiny_stage2.yaml`` from stage 1's projector). Other configs and ``key=value`` overrides per stage can be
given. The command line equivalent is three ``python -m train.mllm_train`` calls (``scripts/quickstart.sh``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from train.mllm.config import load_mllm_config
from train.mllm.train import MLLMTrainResult, train_mllm

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # train/configs
TINY_STAGE1 = CONFIGS / "mllm_tiny_stage1.yaml"
TINY_STAGE2_GROUNDING = CONFIGS / "mllm_tiny_stage2_grounding.yaml"
TINY_STAGE2 = CONFIGS / "mllm_tiny_stage2.yaml"


@dataclass(frozen=True)
class StageRuns:
    """The runs of :func:`train_stages`; ``stage2`` is the final model."""

    stage1: MLLMTrainResult
    stage2_grounding: MLLMTrainResult | None
    stage2: MLLMTrainResult

    @property
    def elapsed_s(self) -> float:
        """Training time of all the runs, in seconds."""
        runs = (self.stage1, self.stage2_grounding, self.stage2)
        return sum(run.elapsed_s for run in runs if run is not None)


def start_overrides(
    vision_tower: str | os.PathLike[str] | None, stage1: MLLMTrainResult, previous: MLLMTrainResult | None = None
) -> list[str]:
    """Where a stage-2 run starts, as overrides: from ``previous`` (an earlier stage-2 phase: its final checkpoint,
    a whole model with tower, projectors, LLM and tokenizer), or else from ``vision_tower`` plus ``stage1``'s
    projector file (which carries any tower part stage 1 tuned)."""
    if previous is not None:
        model = previous.checkpoint or previous.output_dir
        return ["vision_tower=null", "pretrain_mm_projector=null", f"model_path={model}"]
    return [f"vision_tower={vision_tower or 'null'}", f"pretrain_mm_projector={stage1.mm_projector}", "model_path=null"]


def train_stages(
    train_data: str | os.PathLike[str],
    vision_tower: str | os.PathLike[str] | None,
    output_dir: str | os.PathLike[str],
    *,
    grounding_data: str | os.PathLike[str] | None = None,
    stage1_config: str | os.PathLike[str] = TINY_STAGE1,
    stage2_grounding_config: str | os.PathLike[str] = TINY_STAGE2_GROUNDING,
    stage2_config: str | os.PathLike[str] = TINY_STAGE2,
    overrides: Sequence[str] = (),
    stage1_overrides: Sequence[str] = (),
    stage2_grounding_overrides: Sequence[str] = (),
    stage2_overrides: Sequence[str] = (),
) -> StageRuns:
    """Train stage 1 on ``train_data`` into ``output_dir/stage1``; then, with ``grounding_data``, stage 2's first
    phase on it (from stage 1's ``mm_projector.safetensors``) into ``output_dir/stage2_grounding``; then stage 2 on
    ``train_data`` (from the first phase's model, or without one from stage 1's projector) into ``output_dir/stage2``.

    ``vision_tower``: a CLOC checkpoint or run folder (``None``: the tiny tower of :mod:`mllm.tiny`). ``overrides``
    apply to every run, then the per-run overrides to one.
    """
    out = Path(output_dir)
    tower = f"vision_tower={vision_tower or 'null'}"
    common = [f"train_data={train_data}", tower, *overrides]
    stage1 = train_mllm(
        load_mllm_config(stage1_config, [*common, f"output_dir={out / 'stage1'}", *stage1_overrides]).validate()
    )
    grounding = None
    if grounding_data is not None:
        grounding = train_mllm(
            load_mllm_config(
                stage2_grounding_config,
                [
                    *common,
                    f"train_data={grounding_data}",
                    *start_overrides(vision_tower, stage1),
                    f"output_dir={out / 'stage2_grounding'}",
                    *stage2_grounding_overrides,
                ],
            ).validate()
        )
    start = start_overrides(vision_tower, stage1, grounding)
    stage2 = train_mllm(
        load_mllm_config(stage2_config, [*common, *start, f"output_dir={out / 'stage2'}", *stage2_overrides]).validate()
    )
    return StageRuns(stage1, grounding, stage2)


__all__ = ["TINY_STAGE1", "TINY_STAGE2", "TINY_STAGE2_GROUNDING", "StageRuns", "start_overrides", "train_stages"]
