"""Both MLLM stages in one call, from Python: stage 1 (projectors), then stage 2 from its projector file (which
carries any vision-tower parts stage 1 tuned).

    from train.mllm.stages import train_stages
    stage1, stage2 = train_stages("runs/world/train_conv.json", "runs/cloc_tiny", "runs/mllm_tiny")

runs ``train/configs/mllm_tiny_stage1.yaml`` then ``mllm_tiny_stage2.yaml`` (the synthetic-world recipe) into
``<out>/stage1`` and ``<out>/stage2``; other configs and ``key=value`` overrides per stage can be given. The command
line equivalent is two ``python -m train.mllm_train`` calls (``scripts/quickstart.sh``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from train.mllm.config import load_mllm_config
from train.mllm.train import MLLMTrainResult, train_mllm

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # train/configs
TINY_STAGE1 = CONFIGS / "mllm_tiny_stage1.yaml"
TINY_STAGE2 = CONFIGS / "mllm_tiny_stage2.yaml"


def train_stages(
    train_data: str | os.PathLike[str],
    vision_tower: str | os.PathLike[str] | None,
    output_dir: str | os.PathLike[str],
    *,
    stage1_config: str | os.PathLike[str] = TINY_STAGE1,
    stage2_config: str | os.PathLike[str] = TINY_STAGE2,
    overrides: Sequence[str] = (),
    stage1_overrides: Sequence[str] = (),
    stage2_overrides: Sequence[str] = (),
) -> tuple[MLLMTrainResult, MLLMTrainResult]:
    """Train stage 1 into ``output_dir/stage1`` and stage 2 (from stage 1's ``mm_projector.safetensors``: its
    projectors and tuned tower parts) into ``output_dir/stage2``.

    ``vision_tower``: a CLOC checkpoint or run folder (``None``: the tiny tower of :mod:`mllm.tiny`). ``overrides``
    apply to both stages, then ``stage1_overrides`` / ``stage2_overrides`` to one.
    """
    out = Path(output_dir)
    common = [f"train_data={train_data}", f"vision_tower={vision_tower or 'null'}", *overrides]
    stage1 = train_mllm(
        load_mllm_config(stage1_config, [*common, f"output_dir={out / 'stage1'}", *stage1_overrides]).validate()
    )
    projector = f"pretrain_mm_projector={stage1.mm_projector}"
    stage2 = train_mllm(
        load_mllm_config(
            stage2_config, [*common, projector, f"output_dir={out / 'stage2'}", *stage2_overrides]
        ).validate()
    )
    return stage1, stage2


__all__ = ["TINY_STAGE1", "TINY_STAGE2", "train_stages"]
