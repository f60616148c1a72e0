"""(a) bf16 stage-2 training steps of the 7B-shaped model: tokens/s, model FLOPs and MFU against the card's dense
bf16 peak, peak memory, and the dtype checks of ``bench.real_size``."""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch

from bench.gpu_checks.base import CheckContext
from bench.gpu_checks.device import peak_gib, reset_peak, sync, to_device
from bench.scale.dtypes import DtypeTracer, dtype_checks, geometry_buffers, trace_points
from bench.scale.inputs import stage2_batch
from bench.scale.parameters import CLOC_PARTS, count_parameters, stage2_trainable
from bench.scale.shapes import build_model

BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)
"""Dense bf16 tensor-core peaks (TFLOPS, no sparsity) by a substring of ``torch.cuda.get_device_name``; the first
match wins, so the specific names come first."""

MIN_GPU_PARAMETERS = 1_000_000_000


def device_peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of a device by name (:data:`BF16_PEAK_TFLOPS`), ``None`` when unknown."""
    for key, tflops in BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def stage2_step_flops(config: Any, counts: Mapping[str, int], batch: int, tokens: int, images: int) -> float:
    """Model FLOPs of one stage-2 step (PaLM's convention; no recomputation counted).

    LLM (trained): ``6·N·T + 12·L·d·s·T`` with ``N`` the matmul parameters (body without the embedding table, plus
    the LM head), ``T = batch·tokens`` and ``s = tokens``. ViT (frozen: forward only): ``2·N_vit·P + 4·L_v·d_v·P²``
    per image of ``P`` tokens. Projectors (trained): ``6·N_proj`` per image token; prompter and region projector
    are negligible and not counted.
    """
    text, vision = config.text_config, config.vision_config.vision_config
    dense = counts["LLM"] - text.vocab_size * text.hidden_size
    total_tokens = batch * tokens
    llm = 6 * dense * total_tokens + 12 * text.num_hidden_layers * text.hidden_size * tokens * total_tokens
    patches = config.vision_config.num_patches + int(config.vision_config.has_cls_token)
    vit = images * (2 * counts["ViT"] * patches + 4 * vision.num_hidden_layers * vision.hidden_size * patches**2)
    projector = 6 * counts["image projector"] * images * config.image_seq_length
    return float(llm + vit + projector)


def part_train_step(ctx: CheckContext) -> dict[str, Any]:
    """(a) bf16 stage-2 steps at the 7B widths: tokens/s, MFU, memory, dtypes."""
    settings, device = ctx.settings, ctx.device
    reset_peak(device)
    model = build_model(ctx.config, torch.bfloat16, device)
    counts = count_parameters(model, CLOC_PARTS)
    if not settings.smoke and counts["total"] < MIN_GPU_PARAMETERS:
        raise ValueError(f"the model has {counts['total']:,} parameters; the check wants >= 1B (more --text-layers)")
    trainable = stage2_trainable(model)
    model.train()
    batch, _ = stage2_batch(ctx.processor, settings.train_batch)
    batch = to_device(batch, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    tracer = DtypeTracer(model, trace_points(model))

    def step(record: bool) -> float:
        sync(device)
        start = time.perf_counter()
        with tracer.recording() if record else contextlib.nullcontext():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"loss is {loss.item()}")
        step.loss = float(loss.detach().float())  # type: ignore[attr-defined]
        return time.perf_counter() - start

    step(record=True)  # warm-up (kernels, allocator) with the dtype hooks on
    tracer.close()
    times = [step(record=False) for _ in range(settings.train_steps)]
    seconds = statistics.median(times)
    tokens = int(batch["input_ids"].shape[1])
    flops = stage2_step_flops(ctx.config, counts, settings.train_batch, tokens, settings.train_batch)
    name = device_name(device)
    peak = device_peak_tflops(name) if device.type == "cuda" else None
    records = tracer.records(torch.bfloat16) + geometry_buffers(model)
    checks = dtype_checks(records)
    failed = [f"{r.label}: {r.input_dtype} → {r.output_dtype}" for r in records if r.ok is False]
    return {
        "parameters": counts["total"],
        "trainable": sum(trainable.values()),
        "text_layers": ctx.config.text_config.num_hidden_layers,
        "batch": settings.train_batch,
        "tokens_per_sample": tokens,
        "step_s": seconds,
        "tokens_per_s": settings.train_batch * tokens / seconds,
        "model_tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / seconds / 1e12,
        "peak_bf16_tflops": peak,
        "mfu": flops / seconds / (peak * 1e12) if peak else "n/a",
        "peak_memory_gib": peak_gib(device),
        "loss": step.loss,  # type: ignore[attr-defined]
        "dtype_checks": checks,
        "dtype_failures": failed,
    }
