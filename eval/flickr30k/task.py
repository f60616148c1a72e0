"""Flickr30k Entities phrase grounding: reading the official annotations, one grounding question per phrase, and
Recall@1 under the two protocols in use.

Layout (github.com/BryanPlummer/flickr30k_entities, images from the Flickr30k dataset)::

    DIR/train.txt, val.txt, test.txt        image ids, one per line
    DIR/Sentences/<id>.txt                  5 captions, phrases marked "[/EN#18/people A man]"
    DIR/Annotations/<id>.xml                PASCAL-VOC style: <size>, <object><name>18</name><bndbox>...
    DIR/flickr30k-images/<id>.jpg           (or --images)

A phrase's entity (``EN#18``) may own several boxes (one ``<object>`` per box; an ``<object>`` may name several
entities). Entities without a box (``<nobndbox>1``, ``<scene>1``, or never annotated such as ``EN#0`` "notvisual")
are not evaluated; their phrases are counted in ``skipped``.

**Recall@1**: the first box of the answer has IoU >= 0.5 with the target. ``merged`` (MDETR's *MergedBox* protocol,
the one Ferret's ``eval_flickr_entities.py`` uses): the target is the smallest box enclosing all the entity's boxes.
``any`` (MDETR's *AnyBox*): any one of the entity's boxes. IoU is computed on boxes normalised by the image size
(the same value as in pixels).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cloc_encoder.boxes import box_iou_pairwise
from cloc_encoder.data.format import RegionTextRecord
from eval.mllm_generation import Question
from mllm.box_codec import Box, BoxCodec
from mllm.prompts import GROUNDING_QUESTION, with_article

PROTOCOLS = ("merged", "any")
SPLITS = ("train", "val", "test")
_PHRASE = re.compile(r"\[/EN#(?P<entity>\d+)(?P<types>(?:/[^\s\]]+)?)\s+(?P<text>[^\]]*)\]")
_DETERMINERS = "the this that these those his her its their my your our"
_QUANTIFIERS = "some many several few both all each every another any most much no one other"
_KEEP_AS_IS = frozenset(f"{_DETERMINERS} {_QUANTIFIERS}".split(" "))


@dataclass(frozen=True)
class Phrase:
    """One marked phrase of a caption: its text, entity id, coarse types and first word's position."""

    text: str
    entity: str
    types: tuple[str, ...]
    first_word: int


@dataclass(frozen=True)
class Sentence:
    text: str
    phrases: tuple[Phrase, ...]


@dataclass(frozen=True)
class ImageBoxes:
    """One annotation file: image size, normalised ``xyxy`` boxes per entity, entities marked nobndbox / scene."""

    width: int
    height: int
    boxes: dict[str, list[Box]]
    nobox: frozenset[str] = frozenset()
    scene: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PhraseTarget:
    """The boxes a phrase refers to (normalised original frame) and its types, for scoring."""

    id: str
    boxes: tuple[Box, ...]
    types: tuple[str, ...] = ()


@dataclass
class PhraseSet:
    """Questions and targets matched by id, and the phrases left out by reason."""

    questions: list[Question] = field(default_factory=list)
    targets: dict[str, PhraseTarget] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)
    num_images: int = 0


def parse_sentences(text: str) -> list[Sentence]:
    """The captions of one ``Sentences/<id>.txt`` (one per non-empty line) with their marked phrases."""
    sentences = []
    for line in text.splitlines():
        if not line.strip():
            continue
        phrases, words, last = [], [], 0
        for match in _PHRASE.finditer(line):
            words += line[last : match.start()].split()
            phrase_words = match.group("text").split()
            types = tuple(t for t in match.group("types").split("/") if t)
            phrases.append(Phrase(" ".join(phrase_words), match.group("entity"), types, len(words)))
            words += phrase_words
            last = match.end()
        words += line[last:].split()
        sentences.append(Sentence(" ".join(words), tuple(phrases)))
    return sentences


def _flag(element: ET.Element, tag: str) -> bool:
    child = element.find(tag)
    return child is not None and (child.text or "0").strip() not in ("", "0")


def parse_annotation(path: str | Path) -> ImageBoxes:
    """One ``Annotations/<id>.xml`` → :class:`ImageBoxes` (boxes normalised by ``<size>``, clipped to [0, 1])."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise ValueError(f"{path}: not valid XML ({error})") from error
    try:
        width = int(root.findtext("size/width", ""))
        height = int(root.findtext("size/height", ""))
    except ValueError as error:
        raise ValueError(f"{path}: missing or invalid <size><width>/<height>") from error
    boxes: dict[str, list[Box]] = {}
    nobox, scene = set(), set()
    for obj in root.iter("object"):
        names = [(n.text or "").strip() for n in obj.findall("name") if (n.text or "").strip()]
        bndbox = obj.find("bndbox")
        if bndbox is None:
            nobox.update(names if _flag(obj, "nobndbox") else [])
            scene.update(names if _flag(obj, "scene") else [])
            continue
        try:
            x1, y1, x2, y2 = (float(bndbox.findtext(k, "")) for k in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as error:
            raise ValueError(f"{path}: <bndbox> of entity {names} is not four numbers") from error
        box = tuple(min(max(v, 0.0), 1.0) for v in (x1 / width, y1 / height, x2 / width, y2 / height))
        for name in names:
            boxes.setdefault(name, []).append(box)  # type: ignore[arg-type]
    return ImageBoxes(width, height, boxes, frozenset(nobox), frozenset(scene))


def read_split(data_dir: str | Path, split: str) -> list[str]:
    """The image ids of ``DIR/<split>.txt``."""
    path = Path(data_dir) / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such split file (expected the Flickr30k Entities layout)")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def is_flickr30k_folder(path: str | Path) -> bool:
    """Whether ``path`` has the Flickr30k Entities ``Sentences/`` and ``Annotations/`` folders."""
    return (Path(path) / "Sentences").is_dir() and (Path(path) / "Annotations").is_dir()


def phrase_expression(phrase: str, sentence_initial: bool = False) -> str:
    """The phrase as it is put into "Where is <expression>?": a leading "a"/"an" becomes "the" ("A man in a hat"
    → "the man in a hat"); other determiners and quantifiers stay ("his hand", "some snow"); anything else gets
    "the" (:func:`~mllm.prompts.with_article`: "two dogs" → "the two dogs"). The capital of a
    sentence-initial phrase is lowered ("People" → "the people")."""
    words = phrase.split()
    if not words:
        return phrase
    first = words[0]
    if sentence_initial and first[:1].isupper() and first[1:] == first[1:].lower():
        words[0] = first = first.lower()
    if first.lower() in ("a", "an"):
        return " ".join(["the", *words[1:]]) if len(words) > 1 else first.lower()
    if first.lower() in _KEEP_AS_IS:
        return " ".join([first.lower(), *words[1:]])
    return with_article(" ".join(words))


def flickr_phrase_questions(
    data_dir: str | Path, split: str, images_dir: str | Path | None = None, limit: int | None = None
) -> PhraseSet:
    """One question per phrase with a box in the first ``limit`` images of ``split``; ids are
    ``<image id>-s<sentence>-p<phrase>`` (positions in the caption file, boxless phrases included)."""
    data_dir = Path(data_dir)
    images = Path(images_dir) if images_dir is not None else data_dir / "flickr30k-images"
    image_ids = read_split(data_dir, split)
    result = PhraseSet(num_images=len(image_ids[:limit]))
    for image_id in image_ids[:limit]:
        annotation = parse_annotation(data_dir / "Annotations" / f"{image_id}.xml")
        text = (data_dir / "Sentences" / f"{image_id}.txt").read_text(encoding="utf-8")
        for s, sentence in enumerate(parse_sentences(text)):
            for p, phrase in enumerate(sentence.phrases):
                boxes = annotation.boxes.get(phrase.entity)
                if not boxes:
                    reason = "scene" if phrase.entity in annotation.scene else "nobndbox"
                    known = phrase.entity in annotation.scene or phrase.entity in annotation.nobox
                    result.skipped[reason if known else "not_annotated"] += 1
                    continue
                question_id = f"{image_id}-s{s}-p{p}"
                expression = phrase_expression(phrase.text, phrase.first_word == 0)
                question = GROUNDING_QUESTION.format(expression=expression)
                image = images / f"{image_id}.jpg"
                result.questions.append(Question(question_id, image, question, target_box=merged_box(boxes)))
                result.targets[question_id] = PhraseTarget(question_id, tuple(boxes), phrase.types)
    return result


def region_phrase_questions(records: Sequence[RegionTextRecord]) -> PhraseSet:
    """The same task on a region-text split: every expression of every region is a phrase whose one box is the
    region's (types: the region's ``category``); ids ``<record id>-g<region>-<expression>`` as in ``regions``."""
    result = PhraseSet(num_images=len(records))
    for record in records:
        for index, region in enumerate(record.regions):
            texts = [e.strip() for e in region.expressions if e.strip()]
            if not texts:
                result.skipped["no_expression"] += 1
            for number, text in enumerate(texts):
                question_id = f"{record.id}-g{index}-{number}"
                question = GROUNDING_QUESTION.format(expression=with_article(text))
                box = tuple(float(v) for v in region.box)
                result.questions.append(Question(question_id, record.image_path, question, target_box=box))  # type: ignore[arg-type]
                types = (region.category,) if region.category else ()
                result.targets[question_id] = PhraseTarget(question_id, (tuple(region.box),), types)  # type: ignore[arg-type]
    return result


def merged_box(boxes: Sequence[Sequence[float]]) -> Box:
    """The smallest box enclosing ``boxes``."""
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def phrase_ious(predicted: Mapping[str, Box | None], targets: Mapping[str, PhraseTarget], protocol: str) -> list[float]:
    """Per target (in order): IoU of the predicted box with the merged box (``merged``) or the best of the entity's
    boxes (``any``); 0 without a prediction."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}; choose from {PROTOCOLS}")
    pairs_pred, pairs_gt, owner = [], [], []
    for index, (question_id, target) in enumerate(targets.items()):
        box = predicted.get(question_id)
        if box is None:
            continue
        gts = [merged_box(target.boxes)] if protocol == "merged" else list(target.boxes)
        pairs_pred += [box] * len(gts)
        pairs_gt += gts
        owner += [index] * len(gts)
    best = torch.zeros(len(targets), dtype=torch.float64)
    if owner:
        pred = torch.tensor(pairs_pred, dtype=torch.float64)
        iou = box_iou_pairwise(pred, torch.tensor(pairs_gt, dtype=torch.float64))
        best.scatter_reduce_(0, torch.tensor(owner), iou, reduce="amax")
    return best.tolist()


def phrase_recall(
    predicted: Mapping[str, Box | None], targets: Mapping[str, PhraseTarget], protocol: str, threshold: float = 0.5
) -> dict[str, Any]:
    """Recall@1 (and mean IoU) over all targets and per phrase type; a target without a box counts as a miss."""
    ious = phrase_ious(predicted, targets, protocol)
    hits = [iou >= threshold for iou in ious]
    by_type: dict[str, list[bool]] = {}
    for hit, target in zip(hits, targets.values(), strict=True):
        for phrase_type in target.types:
            by_type.setdefault(phrase_type, []).append(hit)
    return {
        "recall@1": sum(hits) / len(hits) if hits else 0.0,
        "miou": sum(ious) / len(ious) if ious else 0.0,
        "num_phrases": len(hits),
        "by_type": {t: {"recall@1": sum(h) / len(h), "num_phrases": len(h)} for t, h in sorted(by_type.items())},
    }


def score_phrases(
    predictions: Mapping[str, Mapping[str, Any]], targets: Mapping[str, PhraseTarget], codec: BoxCodec
) -> dict[str, Any]:
    """:func:`phrase_recall` under both protocols of the first box in each prediction's ``answer``."""
    boxes = {i: codec.parse_first_box(p.get("answer")) for i, p in predictions.items()}
    scores: dict[str, Any] = {protocol: phrase_recall(boxes, targets, protocol) for protocol in PROTOCOLS}
    scores["no_box"] = sum(1 for i in targets if boxes.get(i) is None)
    return scores


__all__ = [
    "PROTOCOLS",
    "SPLITS",
    "ImageBoxes",
    "Phrase",
    "PhraseSet",
    "PhraseTarget",
    "Sentence",
    "flickr_phrase_questions",
    "is_flickr30k_folder",
    "merged_box",
    "parse_annotation",
    "parse_sentences",
    "phrase_expression",
    "phrase_ious",
    "phrase_recall",
    "read_split",
    "region_phrase_questions",
    "score_phrases",
]
