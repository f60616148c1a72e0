"""Moved to :mod:`train.mllm.stages`; this module only re-exports it, so that
imports from ``train.mllm_stages`` keep working."""

from train.mllm.stages import TINY_STAGE1, TINY_STAGE2, TINY_STAGE2_GROUNDING, StageRuns, train_stages

__all__ = ["TINY_STAGE1", "TINY_STAGE2", "TINY_STAGE2_GROUNDING", "StageRuns", "train_stages"]
