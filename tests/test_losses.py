"""CLOC losses: the >0.9 caption-similarity negative mask, and global-batch gathering across 2 gloo ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from cloc_encoder.distributed import free_port
from cloc_encoder.losses import clip_sigmoid_loss, clip_softmax_loss, grounding_loss, region_text_loss


def _unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _reference_region_loss(regions, texts, scale, threshold):
    """Plain loop implementation of the masked symmetric InfoNCE."""
    logits = scale * regions @ texts.t()
    caption_similarity = texts @ texts.t()
    total = 0.0
    for direction in (logits, (scale * texts @ regions.t())):
        for i in range(len(regions)):
            keep = [j for j in range(len(regions)) if j == i or caption_similarity[i, j] <= threshold]
            total += -(direction[i, i] - torch.logsumexp(direction[i, keep], dim=0))
    return total / (2 * len(regions))


def test_region_loss_masks_near_duplicate_captions():
    regions, texts = _unit(6, 8, 0), _unit(6, 8, 1)
    texts[3] = F.normalize(texts[1] + 0.01 * torch.randn(8), dim=0)  # caption 3 ≈ caption 1 (cos > 0.9)
    scale = torch.tensor(2.0)
    loss = region_text_loss(regions, texts, scale, negative_threshold=0.9)
    expected = _reference_region_loss(regions, texts, scale.exp(), 0.9)
    assert torch.allclose(loss, expected, atol=1e-6)
    unmasked = region_text_loss(regions, texts, scale, negative_threshold=1.1)
    assert not torch.allclose(loss, unmasked)


def test_region_loss_has_no_gradient_through_masked_pairs():
    regions = _unit(4, 8, 2).requires_grad_()
    texts = _unit(4, 8, 3)
    texts[2] = texts[0]  # identical captions: each is masked out of the other's denominator
    region_text_loss(regions, texts, torch.tensor(1.0), 0.9).backward()
    # With the masks, region 0's loss ignores text 2 and vice versa; the gradient still exists and is finite.
    assert torch.isfinite(regions.grad).all()


def test_grounding_loss_denominator_is_4MN():
    predicted = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.4, 0.4]])
    target = torch.tensor([[0.1, 0.0, 0.5, 0.7], [0.2, 0.2, 0.4, 0.4]])
    assert grounding_loss(predicted, target, max_regions=4, batch_size=2).item() == pytest.approx((0.01 + 0.04) / 32)


def _rank_losses(rank: int, world: int, port: int, inputs: dict, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        half = slice(rank * 3, rank * 3 + 3)
        images = inputs["images"][half].clone().requires_grad_()
        texts = inputs["texts"][half].clone()
        # Uneven region counts per rank (3 on rank 0, 2 on rank 1) exercise the padded gather.
        region_slice = slice(0, 3) if rank == 0 else slice(3, 5)
        regions = inputs["regions"][region_slice].clone().requires_grad_()
        region_texts = inputs["region_texts"][region_slice].clone()
        scale = torch.tensor(1.5)
        clip = clip_softmax_loss(images, texts, scale)
        region = region_text_loss(regions, region_texts, scale, 0.9)
        sigmoid = clip_sigmoid_loss(images, texts, scale, torch.tensor(-1.0))
        (clip + region).backward()
        results[rank] = (clip.item(), region.item(), sigmoid.item(), images.grad.clone(), regions.grad.clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_losses_gather_the_global_batch_across_ranks():
    inputs = {
        "images": _unit(6, 8, 4),
        "texts": _unit(6, 8, 5),
        "regions": _unit(5, 8, 6),
        "region_texts": _unit(5, 8, 7),
    }
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_rank_losses, args=(2, free_port(), inputs, results), nprocs=2, start_method="spawn")
    scale = torch.tensor(1.5)
    images = inputs["images"].clone().requires_grad_()
    regions = inputs["regions"].clone().requires_grad_()
    clip = clip_softmax_loss(images, inputs["texts"], scale)
    region = region_text_loss(regions, inputs["region_texts"], scale, 0.9)
    (clip + region).backward()
    # Each rank's loss covers its local queries against the global batch; their mean is the global loss,
    # and the sum of the ranks' gradients (what DDP averages ×world) matches the single-process gradient ×world.
    clip_ranks = [results[r][0] for r in range(2)]
    assert sum(clip_ranks) / 2 == pytest.approx(clip.item(), abs=1e-5)
    region_ranks = [results[r][1] for r in range(2)]
    assert (3 * region_ranks[0] + 2 * region_ranks[1]) / 5 == pytest.approx(region.item(), abs=1e-5)
    sigmoid_ranks = [results[r][2] for r in range(2)]
    single_sigmoid = clip_sigmoid_loss(inputs["images"], inputs["texts"], scale, torch.tensor(-1.0))
    assert sum(sigmoid_ranks) / 2 == pytest.approx(single_sigmoid.item(), abs=1e-5)
    assert torch.isfinite(results[0][3]).all() and torch.isfinite(results[1][4]).all()
