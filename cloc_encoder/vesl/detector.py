"""VESL step 3: localise the phrases with OWLv2 and keep each confident box with its most confident phrase.

OWLv2's processor pads an image at the bottom and right to a square of side ``max(W, H)`` and resizes that square
to ``S × S`` (448 in the paper). The model predicts ``cxcywh`` boxes normalised to the **padded square**, so a box
maps back to the original image as ``x · max(W, H) / W`` and ``y · max(W, H) / H`` (the same as transformers'
``post_process_object_detection`` with ``target_sizes=(H, W)``, divided by the image size), then clipped to
``[0, 1]``. Boxes lying in the padding vanish under clipping and are dropped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from cloc_encoder.vesl.config import BOX_THRESHOLD, DETECTOR_IMAGE_SIZE

MIN_BOX_SIDE = 1e-4
"""Boxes thinner than this (normalised) after clipping are dropped (they would not survive the JSON rounding)."""


@dataclass(frozen=True)
class Detection:
    """One kept box: ``xyxy`` normalised by the original image size, its best phrase and that phrase's score."""

    box: tuple[float, float, float, float]
    phrase: str
    score: float


class Detector(Protocol):
    """Images and each image's phrases → each image's detections."""

    def __call__(self, images: Sequence[Image.Image], phrases: Sequence[Sequence[str]]) -> list[list[Detection]]: ...


def padded_square_to_original(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``(N, 4)`` ``cxcywh`` boxes normalised to OWLv2's bottom/right-padded square → ``xyxy`` normalised by the
    original ``width`` × ``height`` and clipped to ``[0, 1]``."""
    cx, cy, w, h = boxes.unbind(-1)
    side = float(max(width, height))
    sx, sy = side / width, side / height
    xyxy = torch.stack([(cx - w / 2) * sx, (cy - h / 2) * sy, (cx + w / 2) * sx, (cy + h / 2) * sy], dim=-1)
    return xyxy.clamp(0.0, 1.0)


def select_detections(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    phrases: Sequence[str],
    width: int,
    height: int,
    *,
    threshold: float = BOX_THRESHOLD,
    nms_iou: float | None = None,
    max_regions: int | None = None,
) -> list[Detection]:
    """One image's OWLv2 outputs → kept detections, most confident first.

    Args:
        logits: ``(P, Q)`` class logits of P predicted boxes against Q ≥ ``len(phrases)`` queries (queries past
            ``len(phrases)`` are padding and ignored).
        boxes: ``(P, 4)`` ``cxcywh`` boxes in the padded-square frame.
        phrases: the image's phrases (the first ``len(phrases)`` queries).
        threshold: keep boxes whose best phrase has confidence (sigmoid of the logit) above this.
    """
    if not phrases:
        return []
    scores, best = torch.sigmoid(logits[:, : len(phrases)].float()).max(dim=-1)
    xyxy = padded_square_to_original(boxes.float(), width, height)
    keep = (scores > threshold) & ((xyxy[:, 2:] - xyxy[:, :2]) > MIN_BOX_SIDE).all(dim=-1)
    index = torch.nonzero(keep).flatten()
    order = index[torch.argsort(scores[index], descending=True, stable=True)]
    if nms_iou is not None and len(order):
        from torchvision.ops import nms

        kept = nms(xyxy[order], scores[order], nms_iou)
        order = order[kept]
    if max_regions is not None:
        order = order[:max_regions]
    return [
        Detection(tuple(float(v) for v in xyxy[i].tolist()), phrases[int(best[i])], float(scores[i]))  # type: ignore[arg-type]
        for i in order.tolist()
    ]


class OwlDetector:
    """OWLv2 (``Owlv2ForObjectDetection`` from a local folder) as a :class:`Detector`.

    Args:
        path: local checkpoint folder with the model and its processor (image processor + CLIP tokenizer).
        image_size: side of the square model input (the paper: 448). When it differs from the checkpoint's
            training size (960 for the released OWLv2 models) position embeddings are interpolated.
        threshold, nms_iou, max_regions: see :func:`select_detections`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        image_size: int = DETECTOR_IMAGE_SIZE,
        threshold: float = BOX_THRESHOLD,
        nms_iou: float | None = None,
        max_regions: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import AutoProcessor, Owlv2ForObjectDetection

        self.model = Owlv2ForObjectDetection.from_pretrained(path, dtype=dtype).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(path)
        self.image_size = image_size
        self.interpolate = image_size != self.model.config.vision_config.image_size
        self.max_text_length = self.model.config.text_config.max_position_embeddings
        self.threshold = threshold
        self.nms_iou = nms_iou
        self.max_regions = max_regions
        self.device = torch.device(device)
        self.dtype = dtype

    @torch.inference_mode()
    def __call__(self, images: Sequence[Image.Image], phrases: Sequence[Sequence[str]]) -> list[list[Detection]]:
        if len(images) != len(phrases):
            raise ValueError(f"got {len(images)} images but {len(phrases)} phrase lists")
        results: list[list[Detection]] = [[] for _ in images]
        todo = [i for i, image_phrases in enumerate(phrases) if image_phrases]
        if not todo:
            return results
        queries = max(len(phrases[i]) for i in todo)
        texts = [q for i in todo for q in [*phrases[i], *[""] * (queries - len(phrases[i]))]]
        tokens = self.processor.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )
        pixels = self.processor.image_processor(
            [images[i].convert("RGB") for i in todo],
            size={"height": self.image_size, "width": self.image_size},
            return_tensors="pt",
        )["pixel_values"]
        outputs = self.model(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
            pixel_values=pixels.to(self.device, self.dtype),
            interpolate_pos_encoding=self.interpolate,
        )
        for row, i in enumerate(todo):
            width, height = images[i].size
            results[i] = select_detections(
                outputs.logits[row].cpu(),
                outputs.pred_boxes[row].cpu(),
                phrases[i],
                width,
                height,
                threshold=self.threshold,
                nms_iou=self.nms_iou,
                max_regions=self.max_regions,
            )
        return results


__all__ = ["Detection", "Detector", "OwlDetector", "padded_square_to_original", "select_detections"]
