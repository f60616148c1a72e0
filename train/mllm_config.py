"""Moved to :mod:`train.mllm.config`; this module only re-exports it, so that
imports from ``train.mllm_config`` keep working."""

from train.mllm.config import LORA_DEFAULT_LR, STAGE_DEFAULT_LR, MLLMTrainConfig, load_mllm_config

__all__ = ["LORA_DEFAULT_LR", "STAGE_DEFAULT_LR", "MLLMTrainConfig", "load_mllm_config"]
