"""RefCOCO / RefCOCO+ / RefCOCOg read from any of their common layouts (or a region-text split) as :class:`RefSample`s.

One :class:`RefSample` is one referred object: an image, the object's box and its referring expressions. Layouts
(``format``):

- ``refer``: the official ``refer`` toolkit files, ``<data>/<dataset>/refs(<split_by>).p`` (a Python-2 pickle, read
  only through :func:`cloc_encoder.data.safe_pickle.safe_load_pickle`) and ``<data>/<dataset>/instances.json``;
  parsed by :func:`cloc_encoder.data.converters.refcoco.convert_refcoco`.
- ``mdetr``: MDETR's COCO-style ``finetune_<dataset>_<split>.json`` (as used by Ferret, Kosmos-2, GLIP): one
  ``images`` entry per sentence (``caption``, ``file_name``, ``width``, ``height``, ``original_id`` = COCO image
  id) with one annotation (``bbox`` ``[x, y, w, h]`` pixels, ``original_id`` = COCO annotation id). Looked up in
  ``<data>`` and ``<data>/mdetr_annotations``.
- ``parquet``: the lmms-lab ``RefCOCO``/``RefCOCOplus``/``RefCOCOg`` snapshots, ``<data>/**/<split>-*.parquet``
  with one row per object: ``question_id``, ``image`` (encoded bytes, or ``{"bytes": ...}``), ``answer`` (the list
  of expressions), ``bbox`` ``[x, y, w, h]`` pixels. Images are written once, named by a hash of their bytes, to
  ``cache_dir`` (their size is read from the image itself).
- ``regiontext``: a region-text JSONL file or folder (``docs/data_format.md``), e.g. the synthetic world; one sample
  per region that has an expression (REC) or any text (REG).

Frames: ``RefSample.box`` is ``xyxy`` normalised to ``[0, 1]`` by the original image's width and height (pixel
boxes that overflow the image by up to one pixel are clipped; worse ones are skipped and counted).

Ids: the COCO annotation id in ``refer`` and ``mdetr`` (refs that share an annotation are merged, expressions in ref
order), ``question_id`` in ``parquet`` (the lmms-lab files key rows by annotation), ``<record id>-<region index>``
in ``regiontext``. For the same content the three COCO layouts give the same samples.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from cloc_encoder.data.converters.common import (
    ConversionError,
    ConversionReport,
    MissingInputError,
    check_type,
    load_json,
    pixel_xywh_to_normalized,
    require,
    require_size,
)
from cloc_encoder.data.converters.refcoco import SPLIT_BYS, convert_refcoco, refer_paths
from cloc_encoder.data.format import ReadReport, RegionTextRecord, read_region_text
from cloc_encoder.data.images import IMAGE_ERRORS
from mllm.box_codec import Box

DATASETS = tuple(SPLIT_BYS)
SPLITS = ("val", "testA", "testB", "test", "train")
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
FORMATS = ("refer", "mdetr", "parquet", "regiontext")
PARQUET_COLUMNS = ("question_id", "image", "answer", "bbox")


@dataclass(frozen=True)
class RefSample:
    """One referred object. ``box``: normalised original-frame ``xyxy``; ``expressions``: its referring expressions
    (REC asks one question per expression); ``references``: the texts a description of it is scored against (REG:
    the expressions, plus a region caption that is not one of them)."""

    id: str
    image: Path
    width: int
    height: int
    box: Box
    expressions: tuple[str, ...]
    references: tuple[str, ...]


def _unique(texts: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


class _Merger:
    """Collects samples by key; a repeated key adds its expressions to the first sample (same image and box)."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}

    def add(self, key: str, image: Path, width: int, height: int, box: Sequence[float], texts: Sequence[str]) -> None:
        item = self.items.setdefault(
            key, {"image": image, "width": width, "height": height, "box": box, "expressions": []}
        )
        item["expressions"].extend(texts)

    def samples(self, captions: dict[str, str] | None = None) -> list[RefSample]:
        out = []
        for key, item in self.items.items():
            expressions = _unique(item["expressions"])
            caption = (captions or {}).get(key, "")
            out.append(
                RefSample(
                    id=key,
                    image=Path(item["image"]),
                    width=int(item["width"]),
                    height=int(item["height"]),
                    box=tuple(float(v) for v in item["box"]),  # type: ignore[arg-type]
                    expressions=expressions,
                    references=_unique([*expressions, caption]),
                )
            )
        return out


def samples_from_records(records: Sequence[RegionTextRecord], *, by_annotation: bool = False) -> list[RefSample]:
    """Region-text records → one sample per region with any text. ``by_annotation``: key by the region's
    ``attributes["ann_id"]`` (RefCOCO conversions), else ``<record id>-<region index>``."""
    merger, captions = _Merger(), {}
    for record in records:
        for index, region in enumerate(record.regions):
            ann_id = region.attributes.get("ann_id") if by_annotation else None
            key = str(ann_id) if ann_id is not None else f"{record.id}-{index}"
            if not _unique([*region.expressions, region.caption]):
                continue
            merger.add(key, record.image_path, record.width, record.height, region.box, region.expressions)
            captions.setdefault(key, region.caption)
    return merger.samples(captions)


def read_refer(
    root: Path, dataset: str, split: str, images_dir: Path, split_by: str | None = None
) -> tuple[list[RefSample], ConversionReport]:
    """The ``refer`` layout under ``root`` (see the module docstring)."""
    records, report = convert_refcoco(
        root, dataset=dataset, split_by=split_by or DEFAULT_SPLIT_BY[dataset], split=split, images_dir=images_dir
    )
    return samples_from_records(records, by_annotation=True), report


def refer_root(data: Path, dataset: str) -> Path:
    """The ``refer`` root: ``data`` holds ``<dataset>/refs(...).p``, or ``data`` is that ``<dataset>`` folder."""
    return data.parent if data.name == dataset and not (data / dataset).is_dir() else data


def mdetr_path(data: Path, dataset: str, split: str) -> Path | None:
    """``finetune_<dataset>_<split>.json`` in ``data`` or ``data/mdetr_annotations`` (``None`` when absent)."""
    name = f"finetune_{dataset}_{split}.json"
    return next((p for p in (data / name, data / "mdetr_annotations" / name) if p.is_file()), None)


def read_mdetr(path: Path, images_dir: Path) -> tuple[list[RefSample], ConversionReport]:
    """An MDETR ``finetune_*.json`` file (see the module docstring); images at ``images_dir/<file_name>``."""
    data = check_type(load_json(path, "MDETR's finetune_<dataset>_<split>.json (COCO-style)"), dict, str(path))
    report = ConversionReport(source=path.name)
    annotations: dict[Any, dict[str, Any]] = {}
    for index, ann in enumerate(require(data, "annotations", list, str(path))):
        where = f"{path.name}: annotations[{index}]"
        require(ann, "bbox", list, where)
        annotations.setdefault(require(ann, "image_id", (int, str), where), ann)
    merger, per_image = _Merger(), {}
    for index, entry in enumerate(require(data, "images", list, str(path))):
        where = f"{path.name}: images[{index}]"
        entry_id = require(entry, "id", (int, str), where)
        caption = require(entry, "caption", str, where).strip()
        file_name = require(entry, "file_name", str, where)
        width, height = require_size(entry, where)
        ann = annotations.get(entry_id)
        if ann is None:
            report.skip("sentence_without_annotation", where)
            continue
        if not caption:
            report.skip("empty_expression", where)
            continue
        box, reason = pixel_xywh_to_normalized(ann["bbox"], width, height)
        if box is None:
            report.skip(reason, f"{where}: bbox {ann['bbox']!r} in a {width}x{height} image")
            continue
        key = ann.get("original_id")
        if key is None:  # no COCO annotation id: the same box in the same image is the same object
            groups = per_image.setdefault(file_name, {})
            key = f"{Path(file_name).stem}-{groups.setdefault(tuple(ann['bbox']), len(groups))}"
        merger.add(str(key), images_dir / file_name, width, height, box, [caption])
    samples = merger.samples()
    report.records = report.regions = len(samples)
    return samples, report


def parquet_files(data: Path, split: str) -> list[Path]:
    """``<split>-*.parquet`` files anywhere under ``data`` (``val-*`` does not match ``validation``), sorted."""
    return sorted(data.rglob(f"{split}-*.parquet")) if data.is_dir() else []


def _image_bytes(cell: Any) -> bytes | None:
    if isinstance(cell, bytes | bytearray):
        return bytes(cell)
    if isinstance(cell, dict) and isinstance(cell.get("bytes"), bytes | bytearray):
        return bytes(cell["bytes"])
    return None


def _cache_image(raw: bytes, cache_dir: Path) -> tuple[Path, int, int]:
    """Write ``raw`` once to ``cache_dir/<sha256 prefix>.<format>``; returns its path and ``(width, height)``."""
    with Image.open(io.BytesIO(raw)) as image:
        width, height = image.size
        suffix = (image.format or "img").lower()
    path = cache_dir / f"{hashlib.sha256(raw).hexdigest()[:24]}.{suffix}"
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_bytes(raw)
        os.replace(temporary, path)
    return path, width, height


def _parquet_rows(files: Sequence[Path]) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError("reading parquet files needs pyarrow: pip install pyarrow==26.0.1") from error
    for file in files:
        parquet = pq.ParquetFile(file)
        missing = [c for c in PARQUET_COLUMNS if c not in parquet.schema_arrow.names]
        if missing:
            raise ConversionError(
                f"{file}: missing columns {missing}; expected the lmms-lab RefCOCO columns {list(PARQUET_COLUMNS)}, "
                f"found {parquet.schema_arrow.names}"
            )
        number = 0
        for batch in parquet.iter_batches(batch_size=64, columns=list(PARQUET_COLUMNS)):
            for row in batch.to_pylist():
                yield f"{file.name}: row {number}", row
                number += 1


def read_parquet(
    data: Path, split: str, cache_dir: Path, limit: int | None = None
) -> tuple[list[RefSample], ConversionReport]:
    """The lmms-lab parquet layout (see the module docstring); stops after ``limit`` samples."""
    files = parquet_files(data, split)
    if not files:
        raise MissingInputError(
            f"{data}: no {split}-*.parquet file found (the lmms-lab layout is data/<split>-*.parquet)"
        )
    report, merger = ConversionReport(source=f"{data.name} {split}"), _Merger()
    for where, row in _parquet_rows(files):
        if limit is not None and len(merger.items) >= limit:
            break
        raw = _image_bytes(row["image"])
        answer = row["answer"]
        expressions = [answer] if isinstance(answer, str) else [a for a in answer or [] if isinstance(a, str)]
        if raw is None:
            report.skip("no_image_bytes", where)
            continue
        if not _unique(expressions):
            report.skip("no_expression", where)
            continue
        try:
            image, width, height = _cache_image(raw, cache_dir)
        except IMAGE_ERRORS as error:
            report.skip("unreadable_image", f"{where}: {error}")
            continue
        box, reason = pixel_xywh_to_normalized(row["bbox"] or [], width, height)
        if box is None:
            report.skip(reason, f"{where}: bbox {row['bbox']!r} in a {width}x{height} image")
            continue
        merger.add(str(row["question_id"]), image, width, height, box, expressions)
    samples = merger.samples()
    report.records = report.regions = len(samples)
    return samples, report


def read_regiontext(path: Path) -> tuple[list[RefSample], ConversionReport]:
    """A region-text JSONL file or folder of shards; malformed lines are skipped and counted."""
    read = ReadReport()
    records = read_region_text(path, report=read)
    report = ConversionReport(source=path.name)
    for message in read.skipped:
        report.skip("malformed_record", message)
    samples = samples_from_records(records)
    report.records, report.regions = len(records), len(samples)
    return samples, report


def default_images_dir(data: Path) -> Path:
    """Where COCO ``train2014`` images usually sit next to the annotations: the first existing of ``data/train2014``,
    ``data/images/train2014``, ``data/images/mscoco/images/train2014`` (the refer toolkit's), ``data/images``,
    ``data/../train2014`` (else ``data/train2014``)."""
    images = data / "images"
    candidates = (
        data / "train2014",
        images / "train2014",
        images / "mscoco/images/train2014",
        images,
        data.parent / "train2014",
    )
    return next((c for c in candidates if c.is_dir()), candidates[0])


def images_folder(data: Path, format: str, dataset: str | None, images_dir: str | os.PathLike[str] | None) -> Path:
    """The (absolute) COCO image folder of a ``refer``/``mdetr`` read: ``images_dir``, else
    :func:`default_images_dir` of ``data`` (of the refer root for ``refer``)."""
    if images_dir is not None:
        return Path(images_dir).resolve()
    base = refer_root(data, dataset) if format == "refer" and dataset else data
    return default_images_dir(base).resolve()


def detect_format(data: Path, dataset: str | None, split: str | None, split_by: str | None = None) -> str:
    """The layout of ``data``: a file or a folder of ``*.jsonl`` → ``regiontext``; else the first of ``refer``,
    ``mdetr``, ``parquet`` whose files for ``dataset``/``split`` exist. Raises ``FileNotFoundError`` saying what was
    looked for."""
    if data.is_file() or (data.is_dir() and any(data.glob("*.jsonl"))):
        return "regiontext"
    if dataset is None or split is None:
        raise ValueError("--dataset and --split are needed to find RefCOCO files (or give a region-text .jsonl)")
    refs, _ = refer_paths(refer_root(data, dataset), dataset, split_by or DEFAULT_SPLIT_BY[dataset])
    if refs.is_file():
        return "refer"
    if mdetr_path(data, dataset, split) is not None:
        return "mdetr"
    if parquet_files(data, split):
        return "parquet"
    raise FileNotFoundError(
        f"{data}: found none of {refs} (refer), finetune_{dataset}_{split}.json (mdetr), "
        f"**/{split}-*.parquet (lmms-lab parquet), *.jsonl (region-text)"
    )


def read_ref_samples(
    data: str | os.PathLike[str],
    *,
    format: str = "auto",
    dataset: str | None = None,
    split: str | None = None,
    split_by: str | None = None,
    images_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> tuple[list[RefSample], str, ConversionReport]:
    """Read one split in any layout → ``(samples, format used, report of what was skipped)``; first ``limit``
    samples only. ``images_dir`` (``refer``/``mdetr``) defaults to :func:`default_images_dir`; ``cache_dir``
    (``parquet``, where images are written) to ``<data>/image_cache``."""
    data = Path(data)
    if format == "auto":
        format = detect_format(data, dataset, split, split_by)
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; choose auto or one of {list(FORMATS)}")
    if format != "regiontext" and (dataset not in DATASETS or split is None):
        raise ValueError(f"the {format} layout needs --dataset (one of {list(DATASETS)}) and --split")
    images = images_folder(data, format, dataset, images_dir)
    if format == "refer":
        samples, report = read_refer(refer_root(data, dataset), dataset, split, images, split_by)
    elif format == "mdetr":
        path = mdetr_path(data, dataset, split)
        if path is None:
            raise MissingInputError(f"{data}: no finetune_{dataset}_{split}.json (MDETR annotations) here")
        samples, report = read_mdetr(path, images)
    elif format == "parquet":
        samples, report = read_parquet(data, split, Path(cache_dir or data / "image_cache"), limit)
    else:
        samples, report = read_regiontext(data)
    return (samples if limit is None else samples[:limit]), format, report


__all__ = [
    "DATASETS",
    "DEFAULT_SPLIT_BY",
    "FORMATS",
    "SPLITS",
    "RefSample",
    "default_images_dir",
    "detect_format",
    "images_folder",
    "mdetr_path",
    "parquet_files",
    "read_mdetr",
    "read_parquet",
    "read_ref_samples",
    "read_refer",
    "read_regiontext",
    "refer_root",
    "samples_from_records",
]
