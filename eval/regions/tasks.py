"""Grounding and referring questions on a region-text split, and their scores.

- **Grounding** (REC): "Where is <expression>?" → the first box written in the answer, scored by IoU against the
  region's box (normalised original frame). A missing or malformed box counts as a miss (IoU 0). Metrics: Acc@0.5
  (headline), mean IoU, Acc@{0.1, …, 0.9}, centre accuracy (the predicted box's centre lies in the target box).
- **Referring** (region → name): "What is [x1, y1, x2, y2] <region>?" → the answer names the region's ``category``
  when the category words it contains (the words of every category of the split, e.g. the colours and shapes of the
  synthetic world) are exactly the target's. Chance is one over the number of categories.

Questions use the training wording (:data:`mllm.prompts.GROUNDING_QUESTION`, ``REFERRING_QUESTION``) and the
model's box codec, or another wording of :data:`mllm.prompts.WORDINGS` (``wording``) with its codec. Ids are
``<record id>-g<region>-<expression>`` and ``<record id>-r<region>``, so predictions are matched by id, never by
order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cloc_encoder.boxes import box_iou_pairwise
from cloc_encoder.data.format import RegionTextRecord
from eval.mllm_generation import Question
from mllm.box_codec import Box, BoxCodec, get_box_codec
from mllm.prompts import DEFAULT_WORDING, get_wording
from mllm.tokenization import REGION_TOKEN

IOU_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class GroundingTarget:
    id: str
    box: Box


@dataclass(frozen=True)
class ReferringTarget:
    id: str
    category: str


def grounding_questions(
    records: Sequence[RegionTextRecord], expressions: str = "first", wording: str = DEFAULT_WORDING
) -> tuple[list[Question], dict[str, GroundingTarget]]:
    """One question per region expression (``"first"`` or ``"all"`` of each region's expressions), asked in
    ``wording``; regions without an expression are left out (a caption alone may not single a region out)."""
    asked = get_wording(wording)
    if expressions not in ("first", "all"):
        raise ValueError(f"expressions={expressions!r}; expected 'first' or 'all'")
    questions, targets = [], {}
    for record in records:
        for index, region in enumerate(record.regions):
            texts = [e.strip() for e in region.expressions if e.strip()]
            for number, text in enumerate(texts[:1] if expressions == "first" else texts):
                question_id = f"{record.id}-g{index}-{number}"
                question = asked.grounding_question(text)
                box = tuple(float(v) for v in region.box)
                questions.append(Question(question_id, record.image_path, question, target_box=box))  # type: ignore[arg-type]
                targets[question_id] = GroundingTarget(question_id, box)  # type: ignore[arg-type]
    return questions, targets


def referring_questions(
    records: Sequence[RegionTextRecord], codec: BoxCodec, wording: str = DEFAULT_WORDING
) -> tuple[list[Question], dict[str, ReferringTarget]]:
    """One question per region that has a ``category``, asked in ``wording``, the region written ``[box] <region>``
    (the wording's codec, else ``codec``) with its exact box."""
    asked = get_wording(wording)
    codec = get_box_codec(asked.box_codec or codec)
    questions, targets = [], {}
    for record in records:
        for index, region in enumerate(record.regions):
            if not region.category:
                continue
            question_id = f"{record.id}-r{index}"
            region_text = f"{codec.encode(region.box)} {REGION_TOKEN}"
            box = tuple(float(v) for v in region.box)
            questions.append(Question(question_id, record.image_path, asked.referring_question(region_text), (box,)))
            targets[question_id] = ReferringTarget(question_id, region.category)
    return questions, targets


def grounding_metrics(
    predicted: Mapping[str, Box | None], targets: Mapping[str, GroundingTarget]
) -> dict[str, float | int]:
    """Scores of predicted boxes (``None``: no box in the answer) against ``targets``, matched by id; a target with
    no prediction counts as a miss."""
    ids = list(targets)
    if not ids:
        return {"acc@0.5": 0.0, "miou": 0.0, "center_acc": 0.0, "num_questions": 0, "no_box": 0}
    missing = [predicted.get(i) is None for i in ids]
    pred = torch.tensor([predicted.get(i) or (0.0, 0.0, 0.0, 0.0) for i in ids], dtype=torch.float64)
    gt = torch.tensor([targets[i].box for i in ids], dtype=torch.float64)
    iou = box_iou_pairwise(pred, gt)
    iou[torch.tensor(missing)] = 0.0
    centre = (pred[:, :2] + pred[:, 2:]) / 2
    inside = (centre >= gt[:, :2]).all(dim=1) & (centre <= gt[:, 2:]).all(dim=1) & ~torch.tensor(missing)
    metrics: dict[str, float | int] = {
        "acc@0.5": (iou >= 0.5).double().mean().item(),
        "miou": iou.mean().item(),
        "center_acc": inside.double().mean().item(),
    }
    metrics.update({f"acc@{t:g}": (iou >= t).double().mean().item() for t in IOU_THRESHOLDS if t != 0.5})
    metrics.update(num_questions=len(ids), no_box=sum(missing))
    return metrics


def score_grounding(
    predictions: Mapping[str, Mapping[str, Any]], targets: Mapping[str, GroundingTarget], codec: BoxCodec
) -> dict[str, float | int]:
    """:func:`grounding_metrics` of the first box in each prediction's ``answer`` (read with ``codec``)."""
    boxes = {i: codec.parse_first_box(p.get("answer")) for i, p in predictions.items()}
    return grounding_metrics(boxes, targets)


def category_words(categories: Sequence[str]) -> frozenset[str]:
    """Every word of the given category names, lower-cased (the words a referring answer is judged on)."""
    return frozenset(word for category in categories for word in _WORD.findall(category.lower()))


def names_category(answer: object, category: str, vocabulary: frozenset[str]) -> bool:
    """Whether ``answer`` names ``category``: its words from ``vocabulary`` are exactly the category's words."""
    if not isinstance(answer, str):
        return False
    said = {word for word in _WORD.findall(answer.lower()) if word in vocabulary}
    return said == set(_WORD.findall(category.lower()))


def score_referring(
    predictions: Mapping[str, Mapping[str, Any]], targets: Mapping[str, ReferringTarget]
) -> dict[str, float | int]:
    """Share of referring answers that name the target category, and the chance level (1 / categories)."""
    categories = sorted({t.category for t in targets.values()})
    vocabulary = category_words(categories)
    correct = [names_category(predictions.get(i, {}).get("answer"), t.category, vocabulary) for i, t in targets.items()]
    return {
        "accuracy": sum(correct) / len(correct) if correct else 0.0,
        "chance": 1 / len(categories) if categories else 0.0,
        "num_categories": len(categories),
        "num_questions": len(correct),
    }


def constant_box_baselines(
    train_records: Sequence[RegionTextRecord], targets: Mapping[str, GroundingTarget]
) -> dict[str, dict[str, float | int]]:
    """Grounding scores of answers that ignore the question: the mean training box, and a box of the mean training
    size centred in the image."""
    boxes = torch.tensor([r.box for record in train_records for r in record.regions], dtype=torch.float64)
    if len(boxes) == 0:
        raise ValueError("constant_box_baselines needs training records with regions")
    mean_box = tuple(boxes.mean(dim=0).tolist())
    width, height = (boxes[:, 2:] - boxes[:, :2]).mean(dim=0).tolist()
    centre_box = (0.5 - width / 2, 0.5 - height / 2, 0.5 + width / 2, 0.5 + height / 2)
    return {
        "mean_box": grounding_metrics(dict.fromkeys(targets, mean_box), targets),
        "centre_box": grounding_metrics(dict.fromkeys(targets, centre_box), targets),
    }


__all__ = [
    "IOU_THRESHOLDS",
    "GroundingTarget",
    "ReferringTarget",
    "category_words",
    "constant_box_baselines",
    "grounding_metrics",
    "grounding_questions",
    "names_category",
    "referring_questions",
    "score_grounding",
    "score_referring",
]
