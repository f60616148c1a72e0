"""RefCOCO / RefCOCO+ / RefCOCOg in the official ``refer`` layout → region-text records.

Layout (as the ``refer`` toolkit ships it)::

    <root>/<dataset>/refs(<split_by>).p    # Python-2 pickle: a list of refs, read ONLY via safe_load_pickle
    <root>/<dataset>/instances.json        # COCO-style 'images', 'annotations', 'categories'

with ``dataset`` in ``refcoco`` (split_by ``unc``/``google``), ``refcoco+`` (``unc``), ``refcocog``
(``umd``/``google``). A ref is ``{ref_id, ann_id, image_id, category_id, split, sent_ids, file_name,
sentences: [{sent_id, sent, raw, tokens}]}``.

Coordinate frames: the box of a ref is its annotation's COCO ``bbox`` (``[x, y, w, h]`` pixels of the original
COCO image, whose size is in ``instances.json`` ``images``), emitted as ``xyxy`` normalised to ``[0, 1]``.

One record per image of the chosen split (``id`` ``<dataset>-<split_by>-<split>-<image_id>``, sorted by image id,
empty image caption); one region per ref (sorted by ``ref_id``) with ``expressions`` = every ``sentences[*].sent``,
``caption`` = the first, ``category`` = the category name, ``attributes`` = ``{"ref_id", "ann_id"}``. The image
path is ``<images_dir>/<file_name of the image in instances.json>`` (``COCO_train2014_<id:012d>.jpg`` when absent).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from cloc_encoder.data.converters.common import (
    PIXEL_TOLERANCE,
    ConversionError,
    ConversionReport,
    ImageLocator,
    MissingInputError,
    check_type,
    load_json,
    pixel_xywh_to_normalized,
    require,
    require_size,
)
from cloc_encoder.data.format import Region, RegionTextRecord
from cloc_encoder.data.safe_pickle import UnsafePickleError, safe_load_pickle

SPLIT_BYS = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google")}
INSTANCES_WHAT = "the refer toolkit's instances.json ('images', 'annotations', 'categories') for this dataset"


def refer_paths(root: str | os.PathLike[str], dataset: str, split_by: str) -> tuple[Path, Path]:
    """``(refs(<split_by>).p, instances.json)`` under ``<root>/<dataset>/``; checks names, not existence."""
    if dataset not in SPLIT_BYS:
        raise ValueError(f"dataset must be one of {sorted(SPLIT_BYS)}, got {dataset!r}")
    if split_by not in SPLIT_BYS[dataset]:
        raise ValueError(f"{dataset} has split_by {list(SPLIT_BYS[dataset])}, got {split_by!r}")
    folder = Path(root) / dataset
    return folder / f"refs({split_by}).p", folder / "instances.json"


def _load_refs(path: Path, split: str) -> list[dict[str, Any]]:
    if not path.is_file():
        present = sorted(p.name for p in path.parent.glob("refs(*).p")) if path.parent.is_dir() else []
        raise MissingInputError(
            f"{path}: file not found; expected the refer toolkit's refs pickle (from refcoco*.zip)"
            + (f"; this folder has {present}" if present else "")
        )
    try:
        refs = safe_load_pickle(path)
    except UnsafePickleError as error:
        raise ConversionError(str(error)) from error
    check_type(refs, list, str(path))
    chosen = []
    splits = set()
    for index, ref in enumerate(refs):
        where = f"{path}: [{index}]"
        ref_split = require(ref, "split", str, where)
        splits.add(ref_split)
        if ref_split == split:
            for key in ("ref_id", "ann_id", "image_id", "category_id"):
                require(ref, key, int, where)
            for s_index, sentence in enumerate(require(ref, "sentences", list, where)):
                require(sentence, "sent", str, f"{where}.sentences[{s_index}]")
            chosen.append(ref)
    if not chosen:
        raise ConversionError(f"{path}: no refs in split {split!r}; splits present: {sorted(splits)}")
    return chosen


def _load_instances(path: Path) -> tuple[dict[int, tuple[int, int, str]], dict[int, dict[str, Any]], dict[int, str]]:
    data = check_type(load_json(path, INSTANCES_WHAT), dict, str(path))
    images: dict[int, tuple[int, int, str]] = {}
    for index, image in enumerate(require(data, "images", list, str(path))):
        where = f"{path}: images[{index}]"
        image_id = require(image, "id", int, where)
        width, height = require_size(image, where)
        file_name = image.get("file_name") or f"COCO_train2014_{image_id:012d}.jpg"
        images[image_id] = (width, height, check_type(file_name, str, f"{where}.file_name"))
    annotations: dict[int, dict[str, Any]] = {}
    for index, ann in enumerate(require(data, "annotations", list, str(path))):
        where = f"{path}: annotations[{index}]"
        require(ann, "image_id", int, where)
        require(ann, "bbox", list, where)
        annotations[require(ann, "id", int, where)] = ann
    categories: dict[int, str] = {}
    for index, category in enumerate(require(data, "categories", list, str(path))):
        where = f"{path}: categories[{index}]"
        categories[require(category, "id", int, where)] = require(category, "name", str, where)
    return images, annotations, categories


def convert_refcoco(
    root: str | os.PathLike[str],
    *,
    dataset: str = "refcoco",
    split_by: str = "unc",
    split: str = "val",
    images_dir: str | os.PathLike[str] = "images",
    relative_to: str | os.PathLike[str] | None = None,
    check_images: bool = False,
    tolerance: float = PIXEL_TOLERANCE,
    max_examples: int = 20,
) -> tuple[list[RegionTextRecord], ConversionReport]:
    """Convert one split of RefCOCO/+/g (``refer`` layout under ``root``); see the module docstring.

    ``split`` is e.g. ``train``, ``val``, ``testA``, ``testB`` (unc) or ``test`` (umd/google). Raises
    :class:`MissingInputError` for missing files, :class:`ConversionError` for a wrong schema, an unsafe pickle or
    an empty split; refs with unusable boxes or no sentences are skipped and counted in the report.
    """
    refs_path, instances_path = refer_paths(root, dataset, split_by)
    refs = _load_refs(refs_path, split)
    images, annotations, categories = _load_instances(instances_path)
    report = ConversionReport(source=dataset, max_examples=max_examples)
    by_image: dict[int, list[tuple[int, Region]]] = defaultdict(list)
    for ref in refs:
        ref_id, ann_id, image_id = ref["ref_id"], ref["ann_id"], ref["image_id"]
        where = f"{refs_path.name}: ref {ref_id}"
        ann = annotations.get(ann_id)
        if ann is None:
            report.skip("unknown_annotation", f"{where}: ann_id {ann_id} is not in {instances_path.name}")
            continue
        if image_id not in images or ann["image_id"] != image_id:
            report.skip("unknown_image", f"{where}: image {image_id} missing or not the image of ann {ann_id}")
            continue
        expressions = [s["sent"].strip() for s in ref["sentences"] if s["sent"].strip()]
        if not expressions:
            report.skip("ref_without_sentences", where)
            continue
        width, height, _ = images[image_id]
        box, reason = pixel_xywh_to_normalized(ann["bbox"], width, height, tolerance=tolerance)
        if box is None:
            report.skip(reason, f"{where}: bbox {ann['bbox']!r} in a {width}x{height} image")
            continue
        category = categories.get(ref["category_id"])
        region = Region(
            box=box,
            caption=expressions[0],
            category=category,
            expressions=expressions,
            attributes={"ref_id": ref_id, "ann_id": ann_id},
        )
        by_image[image_id].append((ref_id, region))
    locator = ImageLocator(images_dir, relative_to, check_images)
    records: list[RegionTextRecord] = []
    for image_id in sorted(by_image):
        width, height, file_name = images[image_id]
        image_path = locator(file_name)
        if image_path is None:
            report.skip("image_file_missing", f"image {image_id}: {file_name} not found in {images_dir}")
            continue
        regions = [region for _, region in sorted(by_image[image_id], key=lambda item: item[0])]
        records.append(
            RegionTextRecord(
                id=f"{dataset}-{split_by}-{split}-{image_id}",
                image=image_path,
                width=width,
                height=height,
                regions=regions,
                source=dataset,
            )
        )
        report.records += 1
        report.regions += len(regions)
    return records, report


__all__ = ["SPLIT_BYS", "convert_refcoco", "refer_paths"]
