"""(c) A QLoRA step: the model saved, reloaded 4-bit NF4, LoRA adapters, forward + backward + AdamW step."""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

from bench.gpu_checks.base import CheckContext
from bench.gpu_checks.device import peak_gib, reset_peak, sync, to_device
from bench.scale.inputs import stage2_batch
from bench.scale.shapes import build_model


def part_qlora(ctx: CheckContext) -> dict[str, Any]:
    """(c) save → load 4-bit NF4 (``mllm.loading``) → LoRA (``train.mllm_trainable``) → one training step."""
    from mllm.loading import load_pretrained_model
    from train.mllm.config import MLLMTrainConfig
    from train.mllm.trainable import apply_lora, build_optimizer, configure_trainable, parameter_groups

    device, smoke = ctx.device, ctx.settings.smoke
    folder = ctx.work_dir / "qlora_base"
    model = build_model(ctx.config, torch.bfloat16, device)
    model.save_pretrained(folder)
    del model
    gc.collect()
    reset_peak(device)
    start = time.perf_counter()
    quantized = load_pretrained_model(
        folder, bits=4, dtype=torch.bfloat16, device_map={"": str(device) if device.type == "cpu" else 0},
        allow_cpu_quantization=smoke,
    )  # fmt: skip
    load_s = time.perf_counter() - start
    import bitsandbytes as bnb

    four_bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in quantized.modules())
    train_config = MLLMTrainConfig(stage=2, lora=True, bits=4, lora_r=16, lora_alpha=32, device=str(device))
    peft_model = apply_lora(quantized, train_config)
    counts = configure_trainable(peft_model, train_config)
    groups, _ = parameter_groups(peft_model, train_config)
    optimizer = build_optimizer(groups, train_config)
    batch, _ = stage2_batch(ctx.processor, ctx.settings.train_batch)
    batch = to_device(batch, device)
    peft_model.train()
    times = []
    for _ in range(2):
        sync(device)
        start = time.perf_counter()
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"QLoRA loss is {loss.item()}")
    return {
        "linear4bit_modules": four_bit,
        "trainable": counts,
        "load_4bit_s": load_s,
        "step_s": times[-1],
        "loss": float(loss.detach().float()),
        "peak_memory_gib": peak_gib(device),
    }
