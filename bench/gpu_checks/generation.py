"""(d) Generation throughput at batch 1 and 8 against transformers' ``LlavaForConditionalGeneration``."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from bench.gpu_checks.base import CheckContext
from bench.gpu_checks.device import sync, to_device
from bench.scale.shapes import build_model, llava_hf_config


def part_generation(ctx: CheckContext) -> dict[str, Any]:
    """(d) new tokens/s at batch 1 and 8, CLOC-LLaVA vs ``LlavaForConditionalGeneration`` at identical sizes."""
    from transformers import LlavaForConditionalGeneration

    from bench.generate import make_inputs

    settings, device = ctx.settings, ctx.device
    ours = build_model(ctx.config, torch.bfloat16, device).eval()
    llava_config = llava_hf_config(ctx.config)
    torch.manual_seed(0)
    with torch.device(device):
        reference = LlavaForConditionalGeneration._from_config(llava_config, dtype=torch.bfloat16).eval()
    options = {"max_new_tokens": settings.new_tokens, "min_new_tokens": settings.new_tokens, "do_sample": False}
    metrics: dict[str, Any] = {"new_tokens": settings.new_tokens, "rounds": settings.generate_rounds}
    for batch_size in (1, 8):
        inputs = to_device(
            make_inputs(llava_config, batch_size, settings.generate_prompt_tokens, seed=batch_size), device
        )
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        times: dict[str, list[float]] = {"ours": [], "transformers": []}
        for round_index in range(settings.generate_rounds + 1):  # the first round warms up
            for name, model in (("transformers", reference), ("ours", ours)):
                sync(device)
                start = time.perf_counter()
                with torch.inference_mode():
                    model.generate(**inputs, **options)
                sync(device)
                if round_index:
                    times[name].append(time.perf_counter() - start)
        for name, values in times.items():
            metrics[f"{name}_batch{batch_size}_tokens_per_s"] = (
                batch_size * settings.new_tokens / statistics.median(values)
            )
        metrics[f"ratio_batch{batch_size}_ours_vs_transformers"] = (
            metrics[f"ours_batch{batch_size}_tokens_per_s"] / metrics[f"transformers_batch{batch_size}_tokens_per_s"]
        )
    return metrics
