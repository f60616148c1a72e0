"""(e) Region embeddings of the bf16 vision tower against the fp32 one on random boxes, thin ones included."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.nn import functional as F

from bench.gpu_checks.base import CheckContext


def region_test_boxes(count: int, pixels: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(count, 4)`` model-frame boxes and a ``(count,)`` thin-box mask: half ordinary boxes (sides 0.05–1), half
    thin ones (one side 0.5–2 pixels of a ``pixels``-px input), anywhere in the image (including near 1)."""
    half = count // 2
    size = 0.05 + 0.95 * torch.rand(half, 2, generator=generator)
    corner = (1.0 - size) * torch.rand(half, 2, generator=generator)
    ordinary = torch.cat([corner, corner + size], dim=1)
    thin_count = count - half
    thin_side = (0.5 + 1.5 * torch.rand(thin_count, generator=generator)) / pixels
    long_side = 0.1 + 0.8 * torch.rand(thin_count, generator=generator)
    sides = torch.stack([thin_side, long_side], dim=1)
    vertical = torch.rand(thin_count, generator=generator) < 0.5
    sides = torch.where(vertical[:, None], sides, sides.flip(1))
    corner = (1.0 - sides) * torch.rand(thin_count, 2, generator=generator)
    thin = torch.cat([corner, corner + sides], dim=1)
    mask = torch.cat([torch.zeros(half, dtype=torch.bool), torch.ones(thin_count, dtype=torch.bool)])
    return torch.cat([ordinary, thin]), mask


def _cosines(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    cosine = F.cosine_similarity(a.float(), b.float(), dim=-1).cpu()
    return {
        "cos_mean": float(cosine.mean()),
        "cos_min": float(cosine.min()),
        "cos_mean_thin": float(cosine[mask].mean()),
        "cos_min_thin": float(cosine[mask].min()),
    }


def part_region_precision(ctx: CheckContext) -> dict[str, Any]:
    """(e) region embeddings: bf16 tower vs fp32 tower (same weights), and fp32 tower with bf16-rounded boxes."""
    from mllm.vision_tower import CLOCVisionTower

    device, settings = ctx.device, ctx.settings
    torch.manual_seed(0)
    with torch.device(device):
        tower32 = CLOCVisionTower._from_config(ctx.config.vision_config, dtype=torch.float32).eval()
    tower16 = copy.deepcopy(tower32).to(torch.bfloat16)
    size = ctx.config.vision_config.vision_config.image_size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, size, size, generator=generator).to(device)
    boxes, thin = region_test_boxes(settings.region_boxes, size, generator)
    index = (torch.arange(len(boxes)) % 2).to(device)
    boxes = boxes.to(device)
    with torch.inference_mode():
        state32 = tower32.encode_images(pixels)
        pooled32, embed32 = tower32.region_features(state32, boxes, index)
        state16 = tower16.encode_images(pixels.to(torch.bfloat16))
        pooled16, embed16 = tower16.region_features(state16, boxes, index)
        rounded = boxes.to(torch.bfloat16).float()
        state32.key_values = None
        _, embed_r = tower32.region_features(state32, rounded, index)
    return {
        "boxes": len(boxes),
        "thin_boxes": int(thin.sum()),
        "bf16_tower_embedding": _cosines(embed16, embed32, thin),
        "bf16_tower_pooled": _cosines(pooled16, pooled32, thin),
        "bf16_rounded_boxes_fp32_tower_embedding": _cosines(embed_r, embed32, thin),
        "bf16_embedding_dtype": str(embed16.dtype).removeprefix("torch."),
    }
