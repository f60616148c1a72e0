"""The process group of a multi-process run: this process's rank and device, cross-rank reductions.

A run is distributed when the launcher sets ``RANK``/``WORLD_SIZE`` (``torchrun``, ``accelerate launch``, the
``deepspeed`` launcher, or by hand with ``MASTER_ADDR``/``MASTER_PORT``). The backend is ``nccl`` on CUDA and
``gloo`` on CPU. Training (:mod:`train.runtime`, :mod:`train.loop`) and data-parallel evaluation
(:mod:`eval.distributed`) both start their process group here; nothing in this module depends on a training config.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import torch
from torch import distributed as dist


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


def has_native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matrix products in hardware: a CUDA GPU that supports bf16, or a CPU with AMX
    or AVX512-BF16 units (torch's own CPU feature checks). Elsewhere bf16 autocast is emulated, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
        return any(check() for check in checks if check is not None)
    return False


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


__all__ = ["DistributedContext", "free_port", "init_distributed", "resolve_device"]
