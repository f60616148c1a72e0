"""Parameter counts of CLOC-LLaVA and transformers' LLaVA per part, the stage-2 trainable counts, and DeepSpeed's
model-state memory estimates from them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from bench.scale.shapes import llava_hf_config
from mllm import CLOCLlavaConfig, CLOCLlavaForConditionalGeneration

CLOC_PARTS = {
    "ViT": "model.vision_tower.vision_model",
    "prompter": "model.vision_tower.prompter",
    "image projector": "model.multi_modal_projector",
    "region projector": "model.region_projector",
    "LLM body": "model.language_model",
    "LM head": "lm_head",
}
LLAVA_PARTS = {
    "ViT": "model.vision_tower",
    "image projector": "model.multi_modal_projector",
    "LLM body": "model.language_model",
    "LM head": "lm_head",
}


def count_parameters(model: nn.Module, parts: Mapping[str, str]) -> dict[str, int]:
    """Parameters per part (by module-name prefix; shared tensors counted once), plus ``LLM`` (body + head),
    ``total``, ``other`` (anything outside the parts) and ``largest_module`` (most direct parameters of one
    module: what ZeRO-3 gathers at once)."""
    counts = dict.fromkeys(parts, 0)
    seen: set[int] = set()
    total = 0
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        for part, prefix in parts.items():
            if name.startswith(prefix + "."):
                counts[part] += parameter.numel()
                break
    counts["LLM"] = counts["LLM body"] + counts["LM head"]
    counts["total"] = total
    counts["other"] = total - sum(counts[part] for part in parts)
    counts["largest_module"] = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return counts


def meta_parameter_counts(config: CLOCLlavaConfig) -> dict[str, dict[str, int]]:
    """Parameter counts of CLOC-LLaVA and of transformers' LLaVA at ``config``'s sizes, built on the meta device."""
    with torch.device("meta"):
        ours = CLOCLlavaForConditionalGeneration(config)
        reference = LlavaForConditionalGeneration(llava_hf_config(config))
    return {"cloc_llava": count_parameters(ours, CLOC_PARTS), "llava_hf": count_parameters(reference, LLAVA_PARTS)}


def stage2_trainable(model: CLOCLlavaForConditionalGeneration) -> dict[str, int]:
    """Set stage-2 ``requires_grad`` with the trainer's own rules (``train.mllm_trainable``): LLM + both
    projectors, ViT and prompter frozen. Returns the trainable counts per group."""
    from train.mllm.config import MLLMTrainConfig
    from train.mllm.trainable import configure_trainable

    return configure_trainable(model, MLLMTrainConfig(stage=2))


# ----- DeepSpeed memory estimates ----------------------------------------------------------------------------------


def deepspeed_estimates(
    total_params: int, largest_module_params: int, gpus: Sequence[int] = (1, 8), gpu_memory_gb: float = 80.0
) -> list[dict[str, Any]]:
    """DeepSpeed's model-state memory estimates (parameters, gradients, optimizer states; no activations) for ZeRO-2
    and ZeRO-3 on one node of ``gpus`` GPUs, from parameter counts (DeepSpeed's ``estimate_zero*_model_states_mem_
    needs``, the functions behind its ``..._all_cold`` printers; ``additional_buffer_factor`` 1.5, ``zero_init``).

    DeepSpeed counts every parameter as trained (2 + 16 bytes each); stage 2 freezes the ViT, so these are upper
    bounds there. ``fits`` compares the per-GPU number with ``gpu_memory_gb`` (decimal GB, as cards are sold).
    Raises ``ImportError`` without deepspeed.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = []
    for count in gpus:
        for offload in ("none", "cpu"):
            cpu, gpu = estimate_zero2_model_states_mem_needs(
                total_params, num_gpus_per_node=count, cpu_offload=offload == "cpu"
            )
            rows.append(_estimate_row(2, count, f"offload_optimizer={offload}", gpu, cpu, gpu_memory_gb))
        for optimizer, params in (("none", "none"), ("cpu", "none"), ("cpu", "cpu")):
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                total_params,
                largest_module_params,
                num_gpus_per_node=count,
                cpu_offload=optimizer == "cpu",
                cpu_offload_params=params == "cpu",
                zero_init=True,
            )
            options = f"offload_optimizer={optimizer}, offload_param={params}"
            rows.append(_estimate_row(3, count, options, gpu, cpu, gpu_memory_gb))
    return rows


def _estimate_row(stage: int, gpus: int, options: str, gpu: int, cpu: int, limit_gb: float) -> dict[str, Any]:
    return {
        "zero_stage": stage,
        "gpus": gpus,
        "options": options,
        "per_gpu_gib": gpu / 2**30,
        "per_node_cpu_gib": cpu / 2**30,
        "fits": gpu < limit_gb * 1e9,
    }
