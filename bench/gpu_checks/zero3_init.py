"""(f) ZeRO-3 initialisation on one device: the model built under ``HfDeepSpeedConfig``, parameters partitioned."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from bench.gpu_checks.base import CheckContext
from bench.gpu_checks.device import peak_gib, reset_peak
from cloc_encoder.distributed import free_port


@contextlib.contextmanager
def single_process_group(device: torch.device) -> Iterator[None]:
    """A one-process ``torch.distributed`` group for DeepSpeed (NCCL on a GPU, gloo on CPU), torn down after."""
    import deepspeed
    import torch.distributed as dist

    variables = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip
    saved = {key: os.environ.get(key) for key in variables}
    created = not dist.is_initialized()
    os.environ.update({k: v for k, v in variables.items() if created or k not in os.environ})
    try:
        if created:
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
        yield
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def part_zero3_init(ctx: CheckContext) -> dict[str, Any]:
    """(f) build the model under ZeRO-3 the way the trainer does (:func:`train.mllm_zero3.sharded_build`:
    ``HfDeepSpeedConfig`` → transformers' ``deepspeed.zero.Init``)."""
    from mllm import CLOCLlavaForConditionalGeneration
    from train.mllm.zero3 import gathered, partition_report, sharded_build

    device = ctx.device
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3},
    }
    reset_peak(device)
    with single_process_group(device), sharded_build(ds_config):
        if device.type == "cuda":
            torch.cuda.set_device(device)
        start = time.perf_counter()
        model = CLOCLlavaForConditionalGeneration._from_config(ctx.config, dtype=torch.bfloat16)
        build_s = time.perf_counter() - start
        report = partition_report(model)
        with gathered([model.lm_head.weight], modifier_rank=None), torch.no_grad():
            head = model.lm_head.weight
            head_shape, head_finite = tuple(head.shape), bool(torch.isfinite(head).all())
            head_std = float(head.float().std())
    if report["partitioned"] != report["parameters"]:
        raise AssertionError(f"{report['parameters'] - report['partitioned']} parameters were not partitioned")
    return {
        "world_size": 1,
        "build_s": build_s,
        "numel_total": report["full"],
        "numel_per_rank": report["local"],
        "partitioned": report["partitioned"],
        "parameters": report["parameters"],
        "lm_head_gathered_shape": list(head_shape),
        "lm_head_finite": head_finite,
        "lm_head_std": head_std,
        "peak_memory_gib": peak_gib(device),
    }
