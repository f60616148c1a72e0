"""Region inputs of the MLLM: the two layouts of region boxes, and their expansion for beam search.

Boxes here are model-frame ``xyxy`` (normalised over the preprocessed ``S×S`` input), as the prompter reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RegionBoxes = torch.Tensor | Sequence[torch.Tensor | Sequence[Sequence[float]]]
"""``(R, 4)`` boxes (with an ``(R,)`` image index), or one ``(R_i, 4)`` entry per sample."""


def flatten_region_boxes(
    region_boxes: RegionBoxes | None, region_image_index: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[int] | None] | None:
    """Both region layouts → ``(boxes (R, 4) float, image_index (R,) long, per-sample counts or None)``.

    ``region_boxes`` is either a ``(R, 4)`` tensor with ``region_image_index`` ``(R,)`` (regions in the order of the
    ``<region>`` tokens, row-major over the batch), or a list with one ``(R_i, 4)`` entry per sample whose boxes lie
    on that sample's image (one image per sample, image ``i`` for sample ``i``).
    """
    if region_boxes is None:
        if region_image_index is not None:
            raise ValueError("region_image_index was given without region_boxes")
        return None
    if isinstance(region_boxes, torch.Tensor):
        if region_image_index is None:
            raise ValueError(
                "region_boxes as one (R, 4) tensor needs region_image_index (R,); or pass a list per sample"
            )
        boxes, index, counts = region_boxes, region_image_index, None
    else:
        if region_image_index is not None:
            raise ValueError("region_image_index is only for region_boxes as one (R, 4) tensor, not a list per sample")
        per_sample = [torch.as_tensor(b, dtype=torch.float32, device=device).reshape(-1, 4) for b in region_boxes]
        counts = [len(b) for b in per_sample]
        boxes = torch.cat(per_sample) if per_sample else torch.zeros(0, 4, device=device)
        index = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"region_boxes must be (R, 4) model-frame xyxy, got shape {tuple(boxes.shape)}")
    if index.shape != boxes.shape[:1]:
        raise ValueError(f"region_image_index shape {tuple(index.shape)} does not match {boxes.shape[0]} region boxes")
    return boxes.to(device=device, dtype=torch.float32), index.to(device=device, dtype=torch.long), counts


def expand_regions(
    boxes: torch.Tensor, image_index: torch.Tensor, expand_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Regions for images repeated ``expand_size`` times in place (image ``b`` → ``b·k … b·k+k-1``).

    Needs ``image_index`` non-decreasing (regions grouped by image in token order, one image per sample).
    """
    if image_index.numel() > 1 and bool((image_index[1:] < image_index[:-1]).any()):
        raise ValueError("expanding regions for beam search / num_return_sequences needs region_image_index sorted")
    out_boxes, out_index = [], []
    for image in torch.unique_consecutive(image_index).tolist():
        selected = image_index == image
        for copy in range(expand_size):
            out_boxes.append(boxes[selected])
            out_index.append(torch.full((int(selected.sum()),), image * expand_size + copy, device=boxes.device))
    if not out_boxes:
        return boxes, image_index
    return torch.cat(out_boxes), torch.cat(out_index).long()


__all__ = ["RegionBoxes", "expand_regions", "flatten_region_boxes"]
