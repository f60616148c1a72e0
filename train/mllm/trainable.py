"""What trains in an MLLM stage: ``requires_grad`` per stage and ``tune_*`` flags, LoRA / QLoRA adapters, and
the optimizer's parameter groups (per part: LLM, projectors, vision; weight decay on matrices only)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mllm import CLOCLlavaForConditionalGeneration
from train.config import ConfigError
from train.mllm.config import MLLMTrainConfig
from train.mllm.zero3 import full_numel, full_shape

UNUSED_PROMPTER_PARTS = ("text_projection",)
"""Prompter parts the MLLM never uses (text prompts); kept frozen when the prompter is tuned."""
UNUSED_VISION_PARTS = ("post_layernorm", "head")
"""ViT parts whose output the MLLM does not read (the pooled output); kept frozen when the ViT is tuned."""


def unwrap(model: nn.Module) -> CLOCLlavaForConditionalGeneration:
    """The :class:`CLOCLlavaForConditionalGeneration` inside a PEFT / DDP / DeepSpeed wrapper."""
    while not isinstance(model, CLOCLlavaForConditionalGeneration):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module"):
            model = model.module
        else:
            raise TypeError(f"no CLOCLlavaForConditionalGeneration inside {type(model).__name__}")
    return model


def lora_target_modules(model: CLOCLlavaForConditionalGeneration, suffixes: str | None = None) -> list[str]:
    """Full names of the LLM's linear layers (quantised ones included) to put LoRA adapters on; ``suffixes``
    (comma-separated, e.g. ``"q_proj,v_proj"``) keeps those whose last name part is listed."""
    wanted = {s.strip() for s in suffixes.split(",") if s.strip()} if suffixes else None
    names = []
    for name, module in model.model.language_model.named_modules():
        if isinstance(module, nn.Linear) and (wanted is None or name.rsplit(".", 1)[-1] in wanted):
            names.append(f"model.language_model.{name}")
    if not names:
        raise ConfigError(f"lora_target_modules={suffixes!r} matches no linear layer of the language model")
    return names


def apply_lora(model: CLOCLlavaForConditionalGeneration, config: MLLMTrainConfig) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on the LLM (PEFT); QLoRA prepares the quantised model first."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.bits is not None:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_target_modules(model, config.lora_target_modules),
        bias="none",
    )
    return get_peft_model(model, lora_config)


def configure_trainable(module: nn.Module, config: MLLMTrainConfig) -> dict[str, int]:
    """Set ``requires_grad`` for the stage; returns trainable parameter counts per group.

    Always: both projectors. Stage 2: the LLM (all of it, or only the LoRA adapters when ``module`` is a PEFT
    model). ``tune_prompter``: the prompter except its text-prompt projection (and its embedding projection when
    the region projector reads the pooled output). ``tune_vision_tower``: the ViT except its pooled-output head.
    Counts are of full parameters, also when ZeRO-3 has partitioned them. Raises ``ValueError`` for
    ``tune_prompter`` with ``region_feature="roi_align"`` (the prompter is not used then, so it would not train).
    """
    model = unwrap(module)
    if config.tune_prompter and model.config.region_feature == "roi_align":
        raise ValueError(
            "tune_prompter=true, but the model's region_feature is 'roi_align': <region> features are RoI-aligned "
            "patch tokens and the prompter is unused, so it would not train. Drop tune_prompter, or set "
            "model_overrides.region_feature to 'pooled' or 'embedding'"
        )
    lora = module is not model
    for name, parameter in module.named_parameters():
        parameter.requires_grad = lora and "lora_" in name and config.stage == 2
    parts = [model.model.multi_modal_projector, model.model.region_projector]
    if config.stage == 2 and not lora:
        parts += [model.model.language_model, model.lm_head]
    for part in parts:
        for parameter in part.parameters():
            parameter.requires_grad = True
    tower = model.model.vision_tower
    if config.tune_prompter:
        unused = set(UNUSED_PROMPTER_PARTS) | ({"projection"} if model.config.region_feature == "pooled" else set())
        for name, child in tower.prompter.named_children():
            if name not in unused:
                child.requires_grad_(True)
        for parameter in tower.prompter.parameters(recurse=False):
            parameter.requires_grad = True
    if config.tune_vision_tower:
        for name, parameter in tower.vision_model.named_parameters():
            parameter.requires_grad = not any(f".{part}." in f".{name}" for part in UNUSED_VISION_PARTS)
    counts = {group: 0 for group in ("projector", "vision", "llm")}
    for parameter_group, parameter in classify(module):
        if parameter.requires_grad:
            counts[parameter_group] += full_numel(parameter)
    return counts


def classify(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(group, parameter)`` for every parameter: ``projector`` (both projectors), ``vision`` (ViT + prompter) or
    ``llm`` (language model, LM head, LoRA adapters)."""
    model = unwrap(module)
    projector = {
        id(p) for m in (model.model.multi_modal_projector, model.model.region_projector) for p in m.parameters()
    }
    vision = {id(p) for p in model.model.vision_tower.parameters()}
    result = []
    for parameter in module.parameters():
        group = "projector" if id(parameter) in projector else "vision" if id(parameter) in vision else "llm"
        result.append((group, parameter))
    return result


def parameter_groups(module: nn.Module, config: MLLMTrainConfig) -> tuple[list[dict[str, Any]], list[float]]:
    """Optimizer groups of the trainable parameters and their peak lrs: per part (LLM ``lr``, projectors
    ``projector_lr``, vision ``vision_tower_lr``) × weight decay (matrices only: judged by the full shape, as a
    ZeRO-3 parameter's own tensor is a flat slice)."""
    peaks = {
        "llm": config.peak_lr(),
        "projector": config.peak_projector_lr(),
        "vision": config.vision_tower_lr or config.peak_lr(),
    }
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for group, parameter in classify(module):
        if parameter.requires_grad:
            buckets.setdefault((group, len(full_shape(parameter)) >= 2), []).append(parameter)
    groups, lrs = [], []
    for (group, decay), params in sorted(buckets.items(), key=lambda item: (item[0][0], not item[0][1])):
        groups.append(
            {"params": params, "lr": peaks[group], "weight_decay": config.weight_decay if decay else 0.0, "name": group}
        )
        lrs.append(peaks[group])
    if not groups:
        raise ConfigError("nothing to train: no parameter requires a gradient")
    return groups, lrs


def build_optimizer(groups: list[dict[str, Any]], config: MLLMTrainConfig) -> torch.optim.Optimizer:
    """torch AdamW, or DeepSpeed's CPU Adam (``optimizer=cpu_adam``, for ZeRO optimizer offload on GPUs)."""
    clean = [{k: v for k, v in group.items() if k != "name"} for group in groups]
    if config.optimizer == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(clean, lr=clean[0]["lr"], betas=config.betas, eps=config.eps, adamw_mode=True)
    return torch.optim.AdamW(clean, lr=clean[0]["lr"], betas=config.betas, eps=config.eps)


__all__ = [
    "apply_lora",
    "build_optimizer",
    "classify",
    "configure_trainable",
    "lora_target_modules",
    "parameter_groups",
    "unwrap",
]
