"""Visual Genome ``region_descriptions.json`` + ``image_data.json`` → region-text records.

Coordinate frames: a VG region is ``x, y, width, height`` in pixels of the original image whose size is in
``image_data.json``; regions get ``xyxy`` normalised to ``[0, 1]`` by that size. Boxes overflowing the image by at
most :data:`~cloc_encoder.data.converters.common.PIXEL_TOLERANCE` pixel are clipped; others are skipped and counted
(VG has a few regions drawn outside their image).

One record per image (``id`` ``vg-<image_id>``, empty image caption: VG has none), in the order of
``region_descriptions.json``. Each region becomes ``caption`` = the stripped ``phrase``, no category,
``attributes`` = ``{"region_id": ...}``. Exact duplicates (same phrase, case-insensitive, and same box) are dropped
by default. Image paths: ``layout="flat"`` → ``<images_dir>/<image_id>.jpg`` (VG_100K and VG_100K_2 merged into one
folder); ``layout="url"`` → ``<images_dir>/<last folder of url>/<image_id>.jpg`` (e.g. ``VG_100K_2/1.jpg``).
"""

from __future__ import annotations

import os
from typing import Any, Literal

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

REGIONS_WHAT = "Visual Genome region_descriptions.json (a list of {'id', 'regions': [{'phrase', 'x', 'y', ...}]})"
IMAGE_DATA_WHAT = "Visual Genome image_data.json (a list of {'image_id' or 'id', 'width', 'height', 'url'})"

Layout = Literal["flat", "url"]


def _image_id(entry: Any, where: str) -> int:
    check_type(entry, dict, where)
    key = "image_id" if "image_id" in entry else "id"
    return require(entry, key, int, where)


def _image_file(entry: dict[str, Any], image_id: int, layout: Layout, where: str) -> str:
    if layout == "flat":
        return f"{image_id}.jpg"
    url = require(entry, "url", str, where)
    parts = [part for part in url.split("/") if part]
    folder = parts[-2] if len(parts) >= 2 else ""
    return f"{folder}/{image_id}.jpg" if folder else f"{image_id}.jpg"


def _load_images(path: str | os.PathLike[str], layout: Layout) -> dict[int, tuple[int, int, str]]:
    data = check_type(load_json(path, IMAGE_DATA_WHAT), list, str(path))
    images: dict[int, tuple[int, int, str]] = {}
    for index, entry in enumerate(data):
        where = f"{path}: [{index}]"
        image_id = _image_id(entry, where)
        width, height = require_size(entry, where)
        images[image_id] = (width, height, _image_file(entry, image_id, layout, where))
    return images


def _region(raw: Any, where: str, width: int, height: int, tolerance: float, report: ConversionReport) -> Region | None:
    phrase = require(raw, "phrase", str, where).strip()
    coords = [require(raw, key, (int, float), where) for key in ("x", "y", "width", "height")]
    if not phrase:
        report.skip("empty_phrase", f"{where}: region {raw.get('region_id')}")
        return None
    box, reason = pixel_xywh_to_normalized(coords, width, height, tolerance=tolerance)
    if box is None:
        report.skip(reason, f"{where}: x,y,w,h {coords} in a {width}x{height} image")
        return None
    attributes = {"region_id": raw["region_id"]} if "region_id" in raw else {}
    return Region(box=box, caption=phrase, attributes=attributes)


def convert_visual_genome(
    region_descriptions_json: str | os.PathLike[str],
    image_data_json: str | os.PathLike[str],
    *,
    images_dir: str | os.PathLike[str] = "images",
    relative_to: str | os.PathLike[str] | None = None,
    check_images: bool = False,
    layout: Layout = "flat",
    dedupe: bool = True,
    keep_empty: bool = False,
    tolerance: float = PIXEL_TOLERANCE,
    max_examples: int = 20,
) -> tuple[list[RegionTextRecord], ConversionReport]:
    """Convert Visual Genome region descriptions to records; see the module docstring for the mapping.

    Raises :class:`MissingInputError` for missing files and :class:`ConversionError` (naming the file and key) for
    a wrong schema; bad boxes, empty phrases and duplicates are skipped and counted in the report.
    """
    if layout not in ("flat", "url"):
        raise ValueError(f"layout must be 'flat' or 'url', got {layout!r}")
    report = ConversionReport(source="visual_genome", max_examples=max_examples)
    images = _load_images(image_data_json, layout)
    data = check_type(load_json(region_descriptions_json, REGIONS_WHAT), list, str(region_descriptions_json))
    locator = ImageLocator(images_dir, relative_to, check_images)
    records: list[RegionTextRecord] = []
    seen_images: set[int] = set()
    for index, entry in enumerate(data):
        where = f"{region_descriptions_json}: [{index}]"
        image_id = _image_id(entry, where)
        raw_regions = require(entry, "regions", list, where)
        data[index] = None  # free the parsed JSON as we go (the full file is several GB in memory)
        if image_id in seen_images:
            raise ConversionError(f"{where}: image id {image_id} appears twice")
        seen_images.add(image_id)
        if image_id not in images:
            report.skip("unknown_image", f"{where}: image {image_id} is not in {image_data_json}")
            continue
        width, height, file_name = images[image_id]
        regions: list[Region] = []
        keys: set[tuple[str, tuple[float, ...]]] = set()
        for region_index, raw in enumerate(raw_regions):
            region = _region(raw, f"{where}.regions[{region_index}]", width, height, tolerance, report)
            if region is None:
                continue
            key = (region.caption.lower(), tuple(round(v, 6) for v in region.box))
            if dedupe and key in keys:
                report.skip("duplicate_region", f"{where}: {region.caption!r}")
                continue
            keys.add(key)
            regions.append(region)
        if not regions and not keep_empty:
            report.skip("image_without_regions", f"image {image_id} has no usable region")
            continue
        image_path = locator(file_name)
        if image_path is None:
            report.skip("image_file_missing", f"image {image_id}: {file_name} not found in {images_dir}")
            continue
        records.append(
            RegionTextRecord(
                id=f"vg-{image_id}",
                image=image_path,
                width=width,
                height=height,
                regions=regions,
                source="visual_genome",
            )
        )
        report.records += 1
        report.regions += len(regions)
    return records, report


__all__ = ["convert_visual_genome"]
