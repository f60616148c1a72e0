"""Data-parallel evaluation: the same ``python -m eval <benchmark>`` command run by ``torchrun`` or
``accelerate launch`` on several GPUs (or CPU processes).

The launch is read from the environment the launchers set (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``); the process group is started by :func:`cloc_encoder.distributed.init_distributed`
(``nccl`` on CUDA, ``gloo`` on CPU; rank ``r`` uses ``cuda:LOCAL_RANK``). The generation layer
(:func:`eval.mllm_generation.answer_questions`) reads the rank from the started process group: each rank answers
its share of the questions into its own shard file (:mod:`eval.predictions`), and rank 0 merges the shards, scores
and writes the metrics.
"""

from __future__ import annotations

import os

import torch
from torch import distributed as dist

from cloc_encoder.distributed import DistributedContext, init_distributed

LAUNCH_DEVICES = (None, "auto", "cuda", "cpu")


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_context(device: str | None) -> DistributedContext:
    """This process's place in the run and its device, the process group started when a launcher set
    ``WORLD_SIZE`` > 1. ``device``: ``--device`` (``None``: CUDA when available, else CPU); under a launcher only
    ``cuda``/``cpu``/``auto`` are accepted, since each rank takes ``cuda:LOCAL_RANK``."""
    if launched_world_size() <= 1:
        return DistributedContext(device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    if device not in LAUNCH_DEVICES:
        raise ValueError(
            f"--device {device}: under torchrun / accelerate launch each rank uses cuda:LOCAL_RANK; "
            "give --device cuda or cpu, or leave it out"
        )
    return init_distributed(device or "auto")


def data_parallel_rank() -> tuple[int, int]:
    """``(rank, world_size)`` in the started process group; ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this process scores and writes the metrics (rank 0, or the only process)."""
    return data_parallel_rank()[0] == 0


def barrier() -> None:
    """Wait until every rank arrives here (nothing without a process group)."""
    if data_parallel_rank()[1] > 1:
        dist.barrier()


__all__ = ["barrier", "data_parallel_rank", "is_main_process", "launch_context", "launched_world_size"]
