"""(b) Logits with ``sdpa`` against ``eager`` and ``flash_attention_2`` at identical weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from bench.gpu_checks.base import CheckContext, PartSkipped, missing_modules, wheel_for
from bench.gpu_checks.device import to_device
from bench.scale.inputs import stage2_batch
from bench.scale.shapes import build_model


def _logits(model: torch.nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).logits.float()


def part_attention(ctx: CheckContext) -> dict[str, Any]:
    """(b) logits with sdpa vs eager, and vs flash_attention_2 when flash_attn imports on a GPU."""
    device = ctx.device
    model = build_model(ctx.config, torch.bfloat16, device).eval()
    _, prompt = stage2_batch(ctx.processor, 2)
    inputs = {k: v for k, v in to_device(prompt, device).items() if k != "labels"}
    reference = _logits(model, inputs)
    metrics: dict[str, Any] = {"logits_abs_max": float(reference.abs().max()), "tokens": int(reference.shape[1])}
    implementations = ["eager"]
    has_flash = not missing_modules(["flash_attn"]) and device.type == "cuda"
    if has_flash:
        implementations.append("flash_attention_2")
    for implementation in implementations:
        model.set_attn_implementation(implementation)
        other = _logits(model, inputs)
        metrics[f"{implementation}_max_abs_diff"] = float((other - reference).abs().max())
        metrics[f"{implementation}_argmax_agreement"] = float((other.argmax(-1) == reference.argmax(-1)).float().mean())
    model.set_attn_implementation("sdpa")
    if not has_flash:
        reason = "flash_attn not installed" if missing_modules(["flash_attn"]) else "flash_attention_2 needs a GPU"
        raise PartSkipped(
            f"skipped: {reason} (sdpa vs eager: max abs diff {metrics['eager_max_abs_diff']:.3g})",
            [wheel_for("flash_attn")] if missing_modules(["flash_attn"]) else [],
            metrics,
        )
    return metrics
