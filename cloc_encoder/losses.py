"""CLOC losses: ``L = L_CLIP + λ (L_CLOC + w · L_grounding)``.

The loss owns its cross-rank details (as open_clip's ``ClipLoss`` does): embeddings are gathered from every rank
with gradients, so the contrastive terms see the global batch, and regions — whose count differs per rank — are
padded to the largest count before the gather and masked afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import distributed as dist
from torch.nn import functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather ``(N, ...)`` from every rank into ``(world·N, ...)``; gradients flow back to each rank's slice."""
    _, world_size = _world()
    if world_size == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


def gather_padded(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Gather a ``(R_rank, ...)`` tensor whose first size differs per rank.

    Returns the concatenation ``(world·R_max, ...)``, a validity mask ``(world·R_max,)`` and each rank's count.
    """
    _, world_size = _world()
    count = tensor.shape[0]
    if world_size == 1:
        return tensor, torch.ones(count, dtype=torch.bool, device=tensor.device), [count]
    counts = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world_size)]
    dist.all_gather(counts, torch.tensor([count], dtype=torch.long, device=tensor.device))
    sizes = [int(c.item()) for c in counts]
    largest = max(sizes)
    padded = F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, largest - count))
    gathered = gather_with_grad(padded)
    valid = torch.cat([torch.arange(largest, device=tensor.device) < size for size in sizes])
    return gathered, valid, sizes


def clip_softmax_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over the global batch, in fp32. Inputs are local, L2-normalised ``(N, D)``."""
    image_embeds, text_embeds, logit_scale = image_embeds.float(), text_embeds.float(), logit_scale.float()
    rank, _ = _world()
    all_images = gather_with_grad(image_embeds)
    all_texts = gather_with_grad(text_embeds)
    count = image_embeds.shape[0]
    targets = torch.arange(count, device=image_embeds.device) + rank * count
    scale = logit_scale.exp()
    image_to_text = scale * image_embeds @ all_texts.t()
    text_to_image = scale * text_embeds @ all_images.t()
    return (F.cross_entropy(image_to_text, targets) + F.cross_entropy(text_to_image, targets)) / 2


def clip_sigmoid_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss of the local images against every text of the global batch, in fp32."""
    image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
    logit_scale, logit_bias = logit_scale.float(), logit_bias.float()
    rank, _ = _world()
    all_texts = gather_with_grad(text_embeds)
    count = image_embeds.shape[0]
    logits = logit_scale.exp() * image_embeds @ all_texts.t() + logit_bias
    labels = -torch.ones_like(logits)
    labels[torch.arange(count), torch.arange(count) + rank * count] = 1.0
    return -F.logsigmoid(labels * logits).sum() / count


def region_text_loss(
    region_embeds: torch.Tensor,
    region_text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    negative_threshold: float,
) -> torch.Tensor:
    """Symmetric InfoNCE between all region embeddings and all region captions of the global batch.

    Inputs are this rank's L2-normalised ``(R, D)``. A negative whose caption embedding has cosine above
    ``negative_threshold`` with the positive's caption is removed from the denominator (no gradient flows through
    that similarity). Computed in fp32. Returns 0 (with a graph) when there are no regions anywhere.
    """
    region_embeds, region_text_embeds, logit_scale = (
        region_embeds.float(),
        region_text_embeds.float(),
        logit_scale.float(),
    )
    all_regions, valid, counts = gather_padded(region_embeds)
    all_texts, _, _ = gather_padded(region_text_embeds)
    if not bool(valid.any()):
        return region_embeds.sum() * 0.0
    all_regions, all_texts = all_regions[valid], all_texts[valid]
    # A rank without region queries runs the same ops on empty tensors (sum / max(R, 1) gives 0, not the NaN of an
    # empty mean), so every rank's backward holds the same collectives in the same order.
    rank, _ = _world()
    offset = sum(counts[:rank])
    targets = torch.arange(region_embeds.shape[0], device=region_embeds.device) + offset
    with torch.no_grad():
        caption_similarity = region_text_embeds @ all_texts.t()  # (R_local, R_global)
        false_negative = caption_similarity > negative_threshold
        false_negative[torch.arange(len(targets)), targets] = False
    scale = logit_scale.exp()
    region_to_text = (scale * region_embeds @ all_texts.t()).masked_fill(false_negative, float("-inf"))
    text_to_region = (scale * region_text_embeds @ all_regions.t()).masked_fill(false_negative, float("-inf"))
    count = max(region_embeds.shape[0], 1)
    region_loss = F.cross_entropy(region_to_text, targets, reduction="sum") / count
    text_loss = F.cross_entropy(text_to_region, targets, reduction="sum") / count
    return (region_loss + text_loss) / 2


def grounding_loss(
    predicted_boxes: torch.Tensor, target_boxes: torch.Tensor, max_regions: int, batch_size: int
) -> torch.Tensor:
    """L2 on the 4 normalised coordinates, summed in fp32 and divided by ``4·M·N`` as in the paper.

    ``predicted_boxes``/``target_boxes``: ``(R, 4)`` model-frame ``xyxy``.
    """
    denominator = 4 * max_regions * max(batch_size, 1)
    return ((predicted_boxes.float() - target_boxes.float()) ** 2).sum() / denominator


@dataclass
class CLOCLossOutput:
    """Every term, for logging. ``total`` is what backward runs on."""

    total: torch.Tensor
    clip: torch.Tensor
    region: torch.Tensor
    grounding: torch.Tensor
    region_weight: float

    def as_floats(self) -> dict[str, float]:
        return {
            "loss": float(self.total.detach()),
            "loss_clip": float(self.clip.detach()),
            "loss_region": float(self.region.detach()),
            "loss_grounding": float(self.grounding.detach()),
            "lambda": self.region_weight,
        }
