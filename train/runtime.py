"""Process-level setup for training: DeepSpeed config and scalar parameters, the trainers' shared command line.

The process group itself (device choice, ranks, cross-rank reductions) is :mod:`cloc_encoder.distributed`'s, shared
with data-parallel evaluation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from train.config import ConfigError


class BatchConfig(Protocol):
    """The fields of a train config (CLOC or MLLM) that :func:`deepspeed_config` reads."""

    batch_size: int
    gradient_accumulation_steps: int
    grad_clip: float | None
    precision: str


def promote_scalar_parameters(model: nn.Module) -> dict[str, torch.Size]:
    """Give every 0-dim parameter shape ``(1,)``; returns the original shapes by state-dict name.

    DeepSpeed's engine broadcasts parameters as bytes (``p.data.view(torch.uint8)``), which fails for 0-dim tensors
    such as CLIP's ``logit_scale``. The CLOC model computes the same with ``(1,)`` scalars (SigLIP's layout); the
    original shapes are restored when saving (see :func:`checkpoint_state_dict`).
    """
    shapes: dict[str, torch.Size] = {}
    for module_name, module in model.named_modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if parameter.dim() == 0:
                promoted = nn.Parameter(parameter.detach().reshape(1), requires_grad=parameter.requires_grad)
                setattr(module, name, promoted)
                shapes[f"{module_name}.{name}" if module_name else name] = parameter.shape
    return shapes


def checkpoint_state_dict(model: nn.Module, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor] | None:
    """The model's state dict with promoted scalars back in their checkpoint shape (None when nothing changed)."""
    if not shapes:
        return None
    state = model.state_dict()
    for name, shape in shapes.items():
        state[name] = state[name].reshape(shape)
    return state


def _find_auto(value: Any, path: str = "") -> list[str]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _find_auto(v, f"{path}.{k}" if path else str(k))]
    return [path] if value == "auto" else []


def _fill_auto(data: dict[str, Any], auto_values: dict[str, Any]) -> None:
    """Replace ``"auto"`` at the dotted keys of ``auto_values`` (e.g. ``"zero_optimization.reduce_bucket_size"``)."""
    for dotted, value in auto_values.items():
        *parents, leaf = dotted.split(".")
        target = data
        for part in parents:
            target = target.get(part)
            if not isinstance(target, dict):
                break
        else:
            if target.get(leaf) == "auto":
                target[leaf] = value


def deepspeed_config(
    path: str | os.PathLike[str],
    config: BatchConfig,
    world_size: int,
    auto_values: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Read a DeepSpeed JSON config and fill in the values the train config owns.

    Set from ``config`` (any train config with these fields): ``train_micro_batch_size_per_gpu`` (``batch_size``),
    ``gradient_accumulation_steps``, ``train_batch_size``, ``gradient_clipping`` (``grad_clip``, 0 = off) and
    ``bf16.enabled`` (``precision == "bf16"``). The optimizer and schedule are the trainer's own (torch AdamW +
    cosine), so the JSON must not define ``optimizer`` or ``scheduler``; ``fp16`` is not supported (use bf16).
    ``auto_values`` maps dotted keys to the values that replace an ``"auto"`` there (the MLLM trainer sizes ZeRO-3
    buckets from the LLM's hidden size); any other ``"auto"`` is an error.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in data:
            raise ConfigError(
                f"{path}: remove the {key!r} section; the trainer passes its own torch AdamW and cosine schedule "
                "(configure them with lr, betas, weight_decay, warmup_steps in the train config)"
            )
    if data.get("fp16", {}).get("enabled", False):
        raise ConfigError(f"{path}: fp16 is not supported by this trainer; set precision=bf16 instead")
    data["train_micro_batch_size_per_gpu"] = config.batch_size
    data["gradient_accumulation_steps"] = config.gradient_accumulation_steps
    data["train_batch_size"] = config.batch_size * config.gradient_accumulation_steps * world_size
    data["gradient_clipping"] = float(config.grad_clip or 0.0)
    data["bf16"] = {**data.get("bf16", {}), "enabled": config.precision == "bf16"}
    data.setdefault("steps_per_print", 10**9)
    data.setdefault("wall_clock_breakdown", False)
    _fill_auto(data, auto_values or {})
    if leftover := _find_auto(data):
        raise ConfigError(f"{path}: 'auto' is not a DeepSpeed value; set {leftover} explicitly")
    return data


def launch_parser(prog: str, description: str, config_help: str) -> argparse.ArgumentParser:
    """The trainers' shared command line: ``--config``, ``--resume``, the launcher's ``--local_rank``, overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, help=config_help)
    parser.add_argument("--resume", action="store_true", help="resume from output_dir's latest checkpoint")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (dotted keys for mappings)")
    return parser


def prepare_launch(args: argparse.Namespace) -> str:
    """Export the launcher's ``--local_rank`` (the deepspeed launcher passes it as well as ``LOCAL_RANK``), set up
    logging tagged with the rank; returns the rank (``"0"`` in a single process)."""
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    return rank


__all__ = [
    "BatchConfig",
    "checkpoint_state_dict",
    "deepspeed_config",
    "launch_parser",
    "prepare_launch",
    "promote_scalar_parameters",
]
