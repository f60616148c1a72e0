"""Encoder metrics as pure functions on tensors or arrays: region classification, retrieval recall, grounding.

Nothing here knows about data formats or models. Embeddings are compared by cosine similarity (each row is
L2-normalised here, so callers may pass raw embeddings). Boxes are ``xyxy`` in any one frame shared by the
predictions and the ground truth (the project evaluates in the original image frame, normalised to ``[0, 1]``).
Every score is a fraction in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from cloc_encoder.boxes import box_iou_pairwise

ArrayLike = torch.Tensor | np.ndarray | Sequence[Any]
Positives = torch.Tensor | np.ndarray | Sequence[Sequence[int]]

QUERY_CHUNK = 1024
"""Queries scored at once in :func:`retrieval_recall` (bounds memory to ``QUERY_CHUNK × G`` scores)."""


def _as_float(values: ArrayLike) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values).float().cpu()


def _normalised(embeds: ArrayLike, name: str) -> torch.Tensor:
    tensor = _as_float(embeds)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(tensor.shape)}")
    return F.normalize(tensor, dim=-1)


def region_classification(
    region_embeds: ArrayLike,
    class_text_embeds: ArrayLike,
    labels: ArrayLike,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Zero-shot region classification: each region takes the class whose text embedding is most similar.

    Args:
        region_embeds: ``(R, D)`` region embeddings.
        class_text_embeds: ``(C, D)`` one text embedding per class (e.g. of ``"a photo of a {name}"``).
        labels: ``(R,)`` ground-truth class index of each region, in ``[0, C)``.
        class_names: optional ``C`` names used as ``per_class`` keys (class indices otherwise).

    Returns:
        ``accuracy`` (share of regions classified correctly), ``mean_class_accuracy`` (per-class accuracy averaged
        over the classes that have at least one region, as the CLOC paper reports for COCO/LVIS), ``num_regions``,
        ``num_classes`` (classes with regions) and ``per_class`` ``{class: {"accuracy", "count"}}``.
    """
    regions = _normalised(region_embeds, "region_embeds")
    classes = _normalised(class_text_embeds, "class_text_embeds")
    targets = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long().cpu()
    if targets.shape != (regions.shape[0],):
        raise ValueError(f"labels must be ({regions.shape[0]},), got shape {tuple(targets.shape)}")
    if regions.shape[1] != classes.shape[1]:
        raise ValueError(f"embedding sizes differ: regions {regions.shape[1]}, classes {classes.shape[1]}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= classes.shape[0]):
        raise ValueError(f"labels must lie in [0, {classes.shape[0]}) (one per class text embedding)")
    if class_names is not None and len(class_names) != classes.shape[0]:
        raise ValueError(f"got {len(class_names)} class names for {classes.shape[0]} class embeddings")
    if regions.shape[0] == 0:
        return {"accuracy": 0.0, "mean_class_accuracy": 0.0, "num_regions": 0, "num_classes": 0, "per_class": {}}
    correct = _top_classes(regions, classes, 1)[:, 0] == targets
    per_class: dict[Any, dict[str, float | int]] = {}
    for index in targets.unique().tolist():
        members = targets == index
        key = class_names[index] if class_names is not None else index
        per_class[key] = {"accuracy": correct[members].double().mean().item(), "count": int(members.sum())}
    return {
        "accuracy": correct.double().mean().item(),
        "mean_class_accuracy": float(np.mean([entry["accuracy"] for entry in per_class.values()])),
        "num_regions": int(targets.numel()),
        "num_classes": len(per_class),
        "per_class": per_class,
    }


def _top_classes(queries: torch.Tensor, classes: torch.Tensor, k: int) -> torch.Tensor:
    """``(N, k)`` indices of the ``k`` most similar classes per normalised query, best first, scored
    ``QUERY_CHUNK`` queries at a time (memory ``QUERY_CHUNK × C``, e.g. LVIS: 1,203 classes, 240k regions).
    ``k = 1`` is the arg-max (the first class wins a tie)."""
    k = min(k, classes.shape[0])
    top = []
    for start in range(0, len(queries), QUERY_CHUNK):
        scores = queries[start : start + QUERY_CHUNK] @ classes.t()
        top.append(scores.argmax(dim=1, keepdim=True) if k == 1 else scores.topk(k, dim=1).indices)
    return torch.cat(top) if top else torch.zeros(0, k, dtype=torch.long)


def topk_accuracy(
    query_embeds: ArrayLike, class_text_embeds: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 5)
) -> dict[str, float | int]:
    """Zero-shot classification accuracy at each ``k``: the share of queries whose label is among the ``k`` most
    similar class texts (``k`` larger than the number of classes counts every query correct).

    Args:
        query_embeds: ``(N, D)`` image or region embeddings.
        class_text_embeds: ``(C, D)``.
        labels: ``(N,)`` class indices in ``[0, C)``.

    Returns:
        ``{"top<k>": ...}`` for each ``k`` and ``num_queries``.
    """
    queries = _normalised(query_embeds, "query_embeds")
    classes = _normalised(class_text_embeds, "class_text_embeds")
    targets = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long().cpu()
    if targets.shape != (queries.shape[0],):
        raise ValueError(f"labels must be ({queries.shape[0]},), got shape {tuple(targets.shape)}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive, got {list(ks)}")
    top = _top_classes(queries, classes, max(ks))
    hits = top == targets[:, None]
    result: dict[str, float | int] = {
        f"top{k}": hits[:, :k].any(dim=1).double().mean().item() if len(targets) else 0.0 for k in ks
    }
    result["num_queries"] = int(targets.numel())
    return result


def _positive_mask(positives: Positives, start: int, stop: int, gallery_size: int) -> torch.Tensor:
    """Rows ``start:stop`` of the ``(Q, G)`` boolean mask of correct gallery items."""
    if isinstance(positives, (torch.Tensor, np.ndarray)):
        return torch.as_tensor(positives[start:stop]).bool().cpu()
    mask = torch.zeros(stop - start, gallery_size, dtype=torch.bool)
    for row, items in enumerate(positives[start:stop]):
        mask[row, list(items)] = True
    return mask


def retrieval_recall(
    query_embeds: ArrayLike,
    gallery_embeds: ArrayLike,
    positives: Positives,
    ks: Sequence[int] = (1, 10),
) -> dict[str, float | int]:
    """Recall@k: the share of queries with a correct gallery item among their ``k`` most similar items.

    Args:
        query_embeds: ``(Q, D)``.
        gallery_embeds: ``(G, D)``.
        positives: the correct gallery items of each query, as a ``(Q, G)`` boolean mask or ``Q`` lists of gallery
            indices. A query may have several (e.g. duplicate captions); each needs at least one.
        ks: the cut-offs.

    Returns:
        ``{"R@k": ...}`` for each ``k`` and ``num_queries``. The rank of a query is the number of *incorrect*
        gallery items scoring at least as high as its best correct item (ties count against the query, so a
        collapsed model with identical embeddings scores 0, not 1).
    """
    queries = _normalised(query_embeds, "query_embeds")
    gallery = _normalised(gallery_embeds, "gallery_embeds")
    num_queries, gallery_size = queries.shape[0], gallery.shape[0]
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"embedding sizes differ: queries {queries.shape[1]}, gallery {gallery.shape[1]}")
    if len(positives) != num_queries:
        raise ValueError(f"positives has {len(positives)} rows for {num_queries} queries")
    if isinstance(positives, (torch.Tensor, np.ndarray)) and tuple(positives.shape) != (num_queries, gallery_size):
        raise ValueError(f"positives mask must be ({num_queries}, {gallery_size}), got {tuple(positives.shape)}")
    ranks = torch.empty(num_queries, dtype=torch.long)
    for start in range(0, num_queries, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, num_queries)
        scores = queries[start:stop] @ gallery.t()
        mask = _positive_mask(positives, start, stop, gallery_size)
        if not bool(mask.any(dim=1).all()):
            missing = start + int((~mask.any(dim=1)).nonzero()[0])
            raise ValueError(f"query {missing} has no correct gallery item")
        best = scores.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)
        ranks[start:stop] = ((scores >= best) & ~mask).sum(dim=1)
    result: dict[str, float | int] = {f"R@{k}": (ranks < k).double().mean().item() if num_queries else 0.0 for k in ks}
    result["num_queries"] = num_queries
    return result


def box_grounding(pred_boxes: ArrayLike, gt_boxes: ArrayLike, threshold: float = 0.5) -> dict[str, float | int]:
    """Grounding accuracy of predicted boxes against ground truth, row by row.

    Args:
        pred_boxes, gt_boxes: ``(N, 4)`` ``xyxy`` in the same frame.
        threshold: IoU at or above which a prediction counts as correct.

    Returns:
        ``{"acc@<threshold>": share with IoU >= threshold, "miou": mean IoU, "num_boxes": N}``.
    """
    predicted, target = _as_float(pred_boxes).reshape(-1, 4), _as_float(gt_boxes).reshape(-1, 4)
    if predicted.shape != target.shape:
        raise ValueError(f"pred_boxes {tuple(predicted.shape)} and gt_boxes {tuple(target.shape)} differ")
    iou = box_iou_pairwise(predicted, target)
    empty = iou.numel() == 0
    return {
        f"acc@{threshold:g}": 0.0 if empty else (iou >= threshold).double().mean().item(),
        "miou": 0.0 if empty else iou.double().mean().item(),
        "num_boxes": int(iou.numel()),
    }


__all__ = ["box_grounding", "region_classification", "retrieval_recall", "topk_accuracy"]
