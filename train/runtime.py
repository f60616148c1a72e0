"""Process-level setup for training: device choice, the process group, cross-rank reductions, DeepSpeed config.

A run is distributed when the launcher sets ``RANK``/``WORLD_SIZE`` (``torchrun``, the ``deepspeed`` launcher, or
by hand with ``MASTER_ADDR``/``MASTER_PORT``). The backend is ``nccl`` on CUDA and ``gloo`` on CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import distributed as dist
from torch import nn

from train.cloc_config import CLOCTrainConfig, ConfigError


@dataclass
class DistributedContext:
    """This process's place in the run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def reduce(self, values: dict[str, float], op: str = "mean") -> dict[str, float]:
        """Mean, sum or max of each value over ranks (every rank must call this at the same point)."""
        if not self.distributed or not values:
            return dict(values)
        keys = sorted(values)
        tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            tensor /= self.world_size
        return {k: float(v) for k, v in zip(keys, tensor.tolist(), strict=True)}

    def shutdown(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without a GPU raises a clear error."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was asked for but torch sees no CUDA GPU; use device=cpu or device=auto")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (for single-process DeepSpeed and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_distributed(device_choice: str, use_deepspeed: bool = False) -> DistributedContext:
    """Initialise the process group when launched distributed (or always under DeepSpeed, which needs one)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = resolve_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    context = DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)
    if dist.is_available() and dist.is_initialized():
        return context
    if world_size == 1 and not use_deepspeed:
        return context
    if world_size == 1:  # DeepSpeed needs a process group even for one process; avoid its MPI discovery
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    else:
        dist.init_process_group(backend=backend)
    context.initialized_here = True
    return context


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
    config: CLOCTrainConfig,
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


__all__ = [
    "DistributedContext",
    "checkpoint_state_dict",
    "deepspeed_config",
    "free_port",
    "init_distributed",
    "promote_scalar_parameters",
    "resolve_device",
]


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
