"""The VESL pipeline on one machine: load → caption → phrases → detect → shard, batched and resumable.

Each shard is processed in chunks of ``batch_size`` inputs; within a chunk the captioner sees the readable images
and the detector the images that have phrases. The Ray runner (:mod:`cloc_encoder.vesl.ray_runner`) calls the same
stage functions on the same chunks, so both produce the same shards.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cloc_encoder.data.format import ReadReport, Region, RegionTextRecord
from cloc_encoder.data.images import IMAGE_ERRORS
from cloc_encoder.data.shards import is_tar_member, read_image_bytes
from cloc_encoder.vesl.captioner import Captioner, HFCaptioner
from cloc_encoder.vesl.config import VESLConfig, resolve_device
from cloc_encoder.vesl.detector import Detection, Detector, OwlDetector
from cloc_encoder.vesl.phrases import PhraseExtractor
from cloc_encoder.vesl.shards import (
    VESLInput,
    list_inputs,
    prepare_output,
    shard_inputs,
    shard_is_done,
    summarize,
    write_shard,
)

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Item:
    """One input on its way through the stages (no pixels: images are loaded per chunk)."""

    input: VESLInput
    width: int = 0
    height: int = 0
    caption: str = ""
    phrases: list[str] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)
    skip: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["detections"] = [[list(d.box), d.phrase, d.score] for d in self.detections]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Item:
        data = dict(data)
        data["input"] = VESLInput(**data["input"])
        data["detections"] = [Detection(tuple(box), phrase, score) for box, phrase, score in data["detections"]]
        return cls(**data)


def chunks(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def load_images(items: Sequence[Item]) -> list[Image.Image | None]:
    """Open each not-yet-skipped item's image as RGB (recording its size); unreadable ones are skipped with why."""
    images: list[Image.Image | None] = []
    for item in items:
        image = None
        if item.skip is None:
            path = item.input.image
            if not (is_tar_member(path) or os.path.isfile(path)):
                item.skip = f"missing image: {path}"
            else:
                try:
                    with Image.open(io.BytesIO(read_image_bytes(path)) if is_tar_member(path) else path) as opened:
                        opened.load()
                        image = opened.convert("RGB")
                    item.width, item.height = image.size
                except IMAGE_ERRORS as error:
                    item.skip = f"unreadable image: {type(error).__name__}: {error}"
        images.append(image)
    return images


def caption_items(
    items: Sequence[Item], images: Sequence[Image.Image | None], captioner: Captioner | None, recaption: bool
) -> None:
    """Set each readable item's caption: the captioner's (for all, or only where missing unless ``recaption``), or
    the input's own; items left without a caption are skipped."""
    todo = [
        i
        for i, item in enumerate(items)
        if item.skip is None and captioner is not None and (recaption or not item.input.caption.strip())
    ]
    generated = dict(zip(todo, captioner([images[i] for i in todo]), strict=True)) if todo and captioner else {}
    for i, item in enumerate(items):
        if item.skip is None:
            item.caption = generated.get(i, item.input.caption).strip()
            if not item.caption:
                item.skip = "no caption: the input has none and no captioner wrote one"


def phrase_items(items: Sequence[Item], extractor: PhraseExtractor) -> None:
    for item in items:
        if item.skip is None:
            item.phrases = extractor(item.caption)


def detect_items(items: Sequence[Item], images: Sequence[Image.Image | None], detector: Detector) -> None:
    todo = [i for i, item in enumerate(items) if item.skip is None and item.phrases]
    if not todo:
        return
    found = detector([images[i] for i in todo], [items[i].phrases for i in todo])  # type: ignore[misc]
    for i, detections in zip(todo, found, strict=True):
        items[i].detections = list(detections)


def to_record(item: Item, out: Path, absolute_paths: bool) -> RegionTextRecord:
    image = item.input.image if absolute_paths else os.path.relpath(item.input.image, out)
    regions = [Region(list(d.box), caption=d.phrase, attributes={"score": round(d.score, 4)}) for d in item.detections]
    return RegionTextRecord(
        id=item.input.id,
        image=Path(image).as_posix(),
        width=item.width,
        height=item.height,
        caption=item.caption,
        regions=regions,
        source="vesl",
    )


def finish_shard(out: Path, index: int, items: Sequence[Item], config: VESLConfig) -> dict[str, Any]:
    """Items of one shard → records (dropping skipped ones and, unless kept, those without regions) → disk."""
    for item in items:
        if item.skip is None and not item.detections and not config.keep_images_without_regions:
            item.skip = "no region: no box above the confidence threshold"
    kept = [item for item in items if item.skip is None]
    return write_shard(
        out,
        index,
        [item.input for item in items],
        [to_record(item, out, config.absolute_image_paths) for item in kept],
        [(item.input.id, item.skip) for item in items if item.skip is not None],
        sum(len(item.phrases) for item in kept),
        config.fingerprint(),
        config.output_format,
    )


def build_captioner(config: VESLConfig) -> Captioner | None:
    if config.captioner is None:
        return None
    return HFCaptioner(
        config.captioner,
        prompt=config.caption_prompt,
        max_new_tokens=config.caption_max_new_tokens,
        num_beams=config.caption_num_beams,
        device=resolve_device(config.device),
        dtype=DTYPES[config.dtype],
    )


def build_detector(config: VESLConfig) -> Detector:
    return OwlDetector(
        config.detector,
        image_size=config.detector_image_size,
        threshold=config.box_threshold,
        nms_iou=config.nms_iou,
        max_regions=config.max_regions_per_image,
        device=resolve_device(config.device),
        dtype=DTYPES[config.dtype],
    )


def build_extractor(config: VESLConfig) -> PhraseExtractor:
    """The paper's extractor with NLTK's perceptron tagger (checked now, so a missing tagger fails early)."""
    extractor = PhraseExtractor(
        grammar=config.grammar, ignore_words=config.ignore_words, max_phrases=config.max_phrases
    )
    _ = extractor.tagger
    return extractor


@dataclass
class VESLPlan:
    """What a run has to do: the output folder, every shard, and which of them are still pending."""

    out: Path
    shards: list[list[VESLInput]]
    pending: list[int]
    malformed: list[str]


def plan_run(config: VESLConfig) -> VESLPlan:
    """Validate, list the inputs, prepare ``out`` and find the unfinished shards (at most ``max_shards``)."""
    config.validate()
    report = ReadReport()
    inputs = list_inputs(config, report)
    out = prepare_output(config, inputs)
    shards = shard_inputs(inputs, config.shard_size)
    fingerprint = config.fingerprint()
    pending = [
        k for k, shard in enumerate(shards) if not shard_is_done(out, k, shard, fingerprint, config.output_format)
    ]
    if config.max_shards is not None:
        pending = pending[: config.max_shards]
    return VESLPlan(out, shards, pending, report.skipped)


def run_vesl(
    config: VESLConfig,
    *,
    extractor: PhraseExtractor | None = None,
    captioner: Captioner | None = None,
    detector: Detector | None = None,
) -> dict[str, Any]:
    """Run (or resume) VESL on one machine; returns the summary (also written to ``out/summary.json``).

    Components default to those the config names; pass them to reuse loaded models or plug in others.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    plan = plan_run(config)
    done = len(plan.shards) - len(plan.pending)
    if plan.pending:
        extractor = extractor or build_extractor(config)
        captioner = captioner if captioner is not None else build_captioner(config)
        detector = detector or build_detector(config)
    total = sum(len(plan.shards[k]) for k in plan.pending)
    logger.info("VESL: %d shards, %d done, %d to do (%d images)", len(plan.shards), done, len(plan.pending), total)
    with tqdm(total=total, unit="img", desc="VESL", disable=not config.progress) as bar:
        for index in plan.pending:
            items = [Item(entry) for entry in plan.shards[index]]
            for chunk in chunks(items, config.batch_size):
                images = load_images(chunk)
                caption_items(chunk, images, captioner, config.recaption)
                phrase_items(chunk, extractor)  # type: ignore[arg-type]
                detect_items(chunk, images, detector)  # type: ignore[arg-type]
                bar.update(len(chunk))
            finish_shard(plan.out, index, items, config)
    summary = summarize(plan.out, len(plan.shards), plan.malformed)
    summary["elapsed_s"] = round(time.perf_counter() - start, 2)
    return summary


__all__ = [
    "Item",
    "VESLPlan",
    "build_captioner",
    "build_detector",
    "build_extractor",
    "caption_items",
    "detect_items",
    "finish_shard",
    "load_images",
    "phrase_items",
    "plan_run",
    "run_vesl",
]
