"""Box conventions shared by the whole project.

Inside the code a box is ``xyxy`` floats normalised to ``[0, 1]`` by the **original** image's width and height
(see ``docs/boxes.md``). Conversions to and from other conventions happen only at the edges, through the
functions here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BOX_TOLERANCE = 1e-6
"""Slack allowed when validating normalised boxes (float round-off from pixel conversions)."""


class BoxError(ValueError):
    """A box that is not a valid normalised ``xyxy`` box."""


def validate_box(box: Sequence[float], *, where: str = "box") -> tuple[float, float, float, float]:
    """Check that ``box`` is ``[x1, y1, x2, y2]`` in ``[0, 1]`` with ``x1 < x2`` and ``y1 < y2``.

    Returns the box as a tuple of floats clipped to ``[0, 1]``. ``where`` names the offending field in the error.
    """
    if len(box) != 4:
        raise BoxError(f"{where}: expected 4 numbers [x1, y1, x2, y2], got {len(box)}: {list(box)!r}")
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError) as error:
        raise BoxError(f"{where}: box coordinates must be numbers, got {list(box)!r}") from error
    values = (x1, y1, x2, y2)
    if any(v != v for v in values):
        raise BoxError(f"{where}: box has NaN coordinates: {list(box)!r}")
    if any(v < -BOX_TOLERANCE or v > 1 + BOX_TOLERANCE for v in values):
        raise BoxError(f"{where}: box {list(box)!r} is outside [0, 1]; boxes are xyxy normalised by image size")
    if not (x1 < x2 and y1 < y2):
        raise BoxError(f"{where}: box {list(box)!r} is empty or inverted; expected x1 < x2 and y1 < y2")
    return tuple(min(max(v, 0.0), 1.0) for v in values)  # type: ignore[return-value]


def xywh_pixels_to_normalized(box: Sequence[float], width: float, height: float) -> list[float]:
    """COCO-style ``[x, y, w, h]`` in pixels → normalised ``xyxy`` (not clipped; validate afterwards)."""
    x, y, w, h = (float(v) for v in box)
    return [x / width, y / height, (x + w) / width, (y + h) / height]


def xyxy_pixels_to_normalized(box: Sequence[float], width: float, height: float) -> list[float]:
    """``[x1, y1, x2, y2]`` in pixels → normalised ``xyxy``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1 / width, y1 / height, x2 / width, y2 / height]


def normalized_to_xyxy_pixels(box: Sequence[float], width: float, height: float) -> list[float]:
    """Normalised ``xyxy`` → ``[x1, y1, x2, y2]`` in pixels."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1 * width, y1 * height, x2 * width, y2 * height]


def clip_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Clip ``(..., 4)`` normalised boxes to ``[0, 1]``."""
    return boxes.clamp(0.0, 1.0)


def box_iou_pairwise(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two ``(N, 4)`` xyxy tensors → ``(N,)``. Degenerate boxes give IoU 0."""
    top_left = torch.maximum(boxes_a[:, :2], boxes_b[:, :2])
    bottom_right = torch.minimum(boxes_a[:, 2:], boxes_b[:, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area_a = (boxes_a[:, 2:] - boxes_a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (boxes_b[:, 2:] - boxes_b[:, :2]).clamp(min=0).prod(dim=1)
    union = area_a + area_b - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1e-12), torch.zeros_like(union))
