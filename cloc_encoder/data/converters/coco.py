"""COCO ``instances_*.json`` (+ optional ``captions_*.json``) → region-text records.

Coordinate frames: COCO ``bbox`` is ``[x, y, w, h]`` in pixels of the original image (``images[*].width/height``);
regions get ``xyxy`` normalised to ``[0, 1]`` by that width and height. Boxes overflowing the image by at most
:data:`~cloc_encoder.data.converters.common.PIXEL_TOLERANCE` pixel are clipped; others are skipped and counted.

One record per image (``id`` ``coco-<image_id>``), in the order of ``images``. Each kept instance becomes a region
with ``caption`` = ``category`` = the category name and ``attributes`` = ``{"ann_id": <annotation id>}``. The image
caption is the ``caption_index``-th caption of the image (file order of ``captions_*.json``, wrapping around when
an image has fewer), so different indices give different captions of the same image. With
``one_record_per_caption`` each caption gives its own record (``coco-<image_id>-c<k>``) sharing the regions.

LVIS (``lvis_v1_<split>.json``) has the same schema except that images have no ``file_name`` (their path is read
from ``coco_url`` as ``<split folder>/<file>``, e.g. ``val2017/000000397133.jpg``, so ``images_dir`` is the COCO root
holding ``train2017/`` and ``val2017/``), category names are written with underscores (``aerosol_can``: turned
into ``aerosol can``; parentheses such as ``bow (weapon)`` stay) and there are no crowd boxes. Its records are
``lvis-<image_id>`` with ``source="lvis"``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

from cloc_encoder.data.converters.common import (
    PIXEL_TOLERANCE,
    ConversionError,
    ConversionReport,
    ImageLocator,
    check_type,
    load_json,
    pixel_xywh_to_normalized,
    require,
    require_size,
)
from cloc_encoder.data.format import Region, RegionTextRecord

INSTANCES_WHAT = "a COCO instances file (instances_<split>.json with 'images', 'annotations', 'categories')"
LVIS_WHAT = "an LVIS file (lvis_v1_<split>.json with 'images' (with 'coco_url'), 'annotations', 'categories')"
CAPTIONS_WHAT = "a COCO captions file (captions_<split>.json with 'annotations': [{'image_id', 'caption'}])"


def _load_captions(path: str | os.PathLike[str], report: ConversionReport) -> dict[int, list[str]]:
    data = load_json(path, CAPTIONS_WHAT)
    where = f"{path}"
    annotations = require(data, "annotations", list, where)
    captions: dict[int, list[str]] = defaultdict(list)
    for index, ann in enumerate(annotations):
        ann_where = f"{where}: annotations[{index}]"
        image_id = require(ann, "image_id", int, ann_where)
        text = require(ann, "caption", str, ann_where).strip()
        if not text:
            report.skip("empty_caption", f"{ann_where}: image {image_id}")
            continue
        captions[image_id].append(text)
    return captions


def category_names(data: Any, where: str) -> dict[int, str]:
    """``{category id: name}`` of an instances file's ``categories``, in file order."""
    check_type(data, dict, where)
    categories: dict[int, str] = {}
    for index, category in enumerate(require(data, "categories", list, where)):
        cat_where = f"{where}: categories[{index}]"
        categories[require(category, "id", int, cat_where)] = require(category, "name", str, cat_where)
    return categories


def lvis_category_name(name: str) -> str:
    """An LVIS category name as text: underscores become spaces (``"aerosol_can"`` → ``"aerosol can"``)."""
    return " ".join(name.replace("_", " ").split())


def lvis_as_coco(data: Any, where: str) -> dict[str, Any]:
    """A shallow copy of loaded LVIS annotations in the COCO schema: each image without ``file_name`` gets
    ``<split folder>/<file>`` from its ``coco_url``; category names go through :func:`lvis_category_name`."""
    check_type(data, dict, where)
    images = []
    for index, image in enumerate(require(data, "images", list, where)):
        image_where = f"{where}: images[{index}]"
        check_type(image, dict, image_where)
        if "file_name" not in image:
            parts = require(image, "coco_url", str, image_where).rstrip("/").split("/")
            image = {**image, "file_name": "/".join(parts[-2:])}
        images.append(image)
    categories = []
    for index, category in enumerate(require(data, "categories", list, where)):
        name = require(category, "name", str, f"{where}: categories[{index}]")
        categories.append({**category, "name": lvis_category_name(name)})
    return {**data, "images": images, "categories": categories}


def _regions_by_image(
    data: dict[str, Any],
    where: str,
    sizes: dict[int, tuple[int, int]],
    report: ConversionReport,
    *,
    include_crowd: bool,
    tolerance: float,
) -> dict[int, list[Region]]:
    categories = category_names(data, where)
    regions: dict[int, list[Region]] = defaultdict(list)
    for index, ann in enumerate(require(data, "annotations", list, where)):
        ann_where = f"{where}: annotations[{index}]"
        image_id = require(ann, "image_id", int, ann_where)
        category_id = require(ann, "category_id", int, ann_where)
        bbox = require(ann, "bbox", list, ann_where)
        crowd = bool(check_type(ann.get("iscrowd", 0), (int, bool), f"{ann_where}.iscrowd"))
        if image_id not in sizes:
            report.skip("unknown_image", f"{ann_where}: image_id {image_id} is not in 'images'")
            continue
        if category_id not in categories:
            report.skip("unknown_category", f"{ann_where}: category_id {category_id} is not in 'categories'")
            continue
        if crowd and not include_crowd:
            report.skip("crowd_box", f"{ann_where}: iscrowd=1 (use include_crowd to keep)")
            continue
        width, height = sizes[image_id]
        box, reason = pixel_xywh_to_normalized(bbox, width, height, tolerance=tolerance)
        if box is None:
            report.skip(reason, f"{ann_where}: bbox {bbox!r} in a {width}x{height} image")
            continue
        attributes: dict[str, Any] = {"ann_id": ann.get("id")} if "id" in ann else {}
        if crowd:
            attributes["iscrowd"] = 1
        name = categories[category_id]
        regions[image_id].append(Region(box=box, caption=name, category=name, attributes=attributes))
    return regions


def convert_coco(
    instances_json: str | os.PathLike[str],
    *,
    captions_json: str | os.PathLike[str] | None = None,
    images_dir: str | os.PathLike[str] = "images",
    relative_to: str | os.PathLike[str] | None = None,
    check_images: bool = False,
    include_crowd: bool = False,
    keep_empty: bool = False,
    caption_index: int = 0,
    one_record_per_caption: bool = False,
    tolerance: float = PIXEL_TOLERANCE,
    max_examples: int = 20,
) -> tuple[list[RegionTextRecord], ConversionReport]:
    """Convert COCO instances (+ captions) to records; see the module docstring for the mapping.

    ``images_dir``/``relative_to``/``check_images`` build the ``image`` field (see :class:`ImageLocator`).
    ``include_crowd`` keeps ``iscrowd`` boxes (marked ``attributes["iscrowd"] = 1``); ``keep_empty`` keeps images
    with no usable box. Raises :class:`MissingInputError` for missing files and :class:`ConversionError` (naming the
    file and key) for a wrong schema; bad boxes are skipped and counted in the report.
    """
    return convert_coco_data(
        load_json(instances_json, INSTANCES_WHAT),
        where=str(instances_json),
        captions_json=captions_json,
        images_dir=images_dir,
        relative_to=relative_to,
        check_images=check_images,
        include_crowd=include_crowd,
        keep_empty=keep_empty,
        caption_index=caption_index,
        one_record_per_caption=one_record_per_caption,
        tolerance=tolerance,
        max_examples=max_examples,
    )


def convert_lvis(
    lvis_json: str | os.PathLike[str],
    *,
    images_dir: str | os.PathLike[str] = "coco",
    relative_to: str | os.PathLike[str] | None = None,
    check_images: bool = False,
    keep_empty: bool = False,
    tolerance: float = PIXEL_TOLERANCE,
    max_examples: int = 20,
) -> tuple[list[RegionTextRecord], ConversionReport]:
    """Convert LVIS annotations to records (see the module docstring); ``images_dir`` is the COCO root holding
    ``train2017/`` and ``val2017/``. Same errors and report as :func:`convert_coco`."""
    return convert_coco_data(
        lvis_as_coco(load_json(lvis_json, LVIS_WHAT), str(lvis_json)),
        where=str(lvis_json),
        source="lvis",
        images_dir=images_dir,
        relative_to=relative_to,
        check_images=check_images,
        keep_empty=keep_empty,
        tolerance=tolerance,
        max_examples=max_examples,
    )


def convert_coco_data(
    data: Any,
    *,
    where: str = "instances",
    source: str = "coco",
    captions_json: str | os.PathLike[str] | None = None,
    images_dir: str | os.PathLike[str] = "images",
    relative_to: str | os.PathLike[str] | None = None,
    check_images: bool = False,
    include_crowd: bool = False,
    keep_empty: bool = False,
    caption_index: int = 0,
    one_record_per_caption: bool = False,
    tolerance: float = PIXEL_TOLERANCE,
    max_examples: int = 20,
) -> tuple[list[RegionTextRecord], ConversionReport]:
    """:func:`convert_coco` on already loaded instances ``data`` (``where`` names it in errors); records are
    ``<source>-<image_id>`` with that ``source``."""
    if caption_index < 0:
        raise ValueError(f"caption_index must be >= 0, got {caption_index}")
    report = ConversionReport(source=source, max_examples=max_examples)
    check_type(data, dict, where)
    images = require(data, "images", list, where)
    require(data, "annotations", list, where)
    entries: list[tuple[int, str, int, int]] = []
    for index, image in enumerate(images):
        image_where = f"{where}: images[{index}]"
        image_id = require(image, "id", int, image_where)
        file_name = require(image, "file_name", str, image_where)
        width, height = require_size(image, image_where)
        entries.append((image_id, file_name, width, height))
    sizes = {image_id: (width, height) for image_id, _, width, height in entries}
    if len(sizes) != len(entries):
        raise ConversionError(f"{where}: 'images' has duplicate ids")
    regions = _regions_by_image(data, where, sizes, report, include_crowd=include_crowd, tolerance=tolerance)
    captions = _load_captions(captions_json, report) if captions_json is not None else {}
    unknown = set(captions) - set(sizes)
    for image_id in sorted(unknown):
        report.skip("caption_for_unknown_image", f"{captions_json}: image_id {image_id} is not in {where}")
    locator = ImageLocator(images_dir, relative_to, check_images)
    records: list[RegionTextRecord] = []
    for image_id, file_name, width, height in entries:
        image_regions = regions.get(image_id, [])
        if not image_regions and not keep_empty:
            report.skip("image_without_regions", f"image {image_id} ({file_name}) has no usable box")
            continue
        image_path = locator(file_name)
        if image_path is None:
            report.skip("image_file_missing", f"image {image_id}: {file_name} not found in {images_dir}")
            continue
        texts = captions.get(image_id, [])
        if one_record_per_caption and texts:
            chosen = list(enumerate(texts))
        else:
            chosen = [(None, texts[caption_index % len(texts)] if texts else "")]
        for k, text in chosen:
            record_id = f"{source}-{image_id}" if k is None else f"{source}-{image_id}-c{k}"
            records.append(
                RegionTextRecord(
                    id=record_id,
                    image=image_path,
                    width=width,
                    height=height,
                    caption=text,
                    regions=list(image_regions),
                    source=source,
                )
            )
            report.records += 1
            report.regions += len(image_regions)
    return records, report


__all__ = ["category_names", "convert_coco", "convert_coco_data", "convert_lvis", "lvis_as_coco", "lvis_category_name"]
