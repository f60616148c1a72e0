"""The project's one region-text data format (documented in ``docs/data_format.md``).

A data set split is a JSON-Lines file; each line is one image::

    {"id": "syn-train-000000", "image": "images/000000.png", "width": 64, "height": 64,
     "caption": "a red circle and a small blue square",
     "regions": [{"box": [0.1, 0.2, 0.4, 0.5], "caption": "red circle", "category": "red circle",
                  "expressions": ["the red circle left of the square"], "attributes": {"colour": "red"}}],
     "source": "synthetic"}

``image`` is relative to the JSONL file's folder (or absolute). ``box`` is ``xyxy`` normalised to ``[0, 1]`` by the
original image's width and height. Everything but ``id``, ``image``, ``width`` and ``height`` is optional.
Shards (many JSONL files) are read as one data set by :func:`read_region_text`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cloc_encoder.boxes import BoxError, validate_box

FORMAT_VERSION = 1


class RecordError(ValueError):
    """A malformed region-text record; the message names the file, line and field."""


@dataclass
class Region:
    """One region of an image: a normalised ``xyxy`` box and its texts."""

    box: list[float]
    caption: str = ""
    category: str | None = None
    expressions: list[str] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"box": [round(v, 6) for v in self.box], "caption": self.caption}
        if self.category is not None:
            data["category"] = self.category
        if self.expressions:
            data["expressions"] = list(self.expressions)
        if self.attributes:
            data["attributes"] = dict(self.attributes)
        return data


@dataclass
class RegionTextRecord:
    """One image with its caption and regions. ``image`` is a path (relative to ``root`` when not absolute)."""

    id: str
    image: str
    width: int
    height: int
    caption: str = ""
    regions: list[Region] = field(default_factory=list)
    source: str = ""
    root: Path | None = field(default=None, compare=False, repr=False)

    @property
    def image_path(self) -> Path:
        """Absolute path of the image file."""
        path = Path(self.image)
        if path.is_absolute() or self.root is None:
            return path
        return self.root / path

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "image": self.image,
            "width": self.width,
            "height": self.height,
            "caption": self.caption,
            "regions": [region.to_json() for region in self.regions],
        }
        if self.source:
            data["source"] = self.source
        return data


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise RecordError(f"{where}: missing required field '{key}'")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RecordError(f"{where}: field '{key}' must be {kind}, got {type(value).__name__}: {value!r}")
    return value


def parse_record(data: Any, *, where: str = "record", root: Path | None = None) -> RegionTextRecord:
    """Validate one decoded JSON object and build a :class:`RegionTextRecord`.

    Raises :class:`RecordError` naming ``where`` (e.g. ``"train.jsonl:12"``) and the field at fault.
    """
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(data).__name__}")
    record_id = str(_require(data, "id", (str, int), where))
    image = _require(data, "image", str, where)
    width = _require(data, "width", int, where)
    height = _require(data, "height", int, where)
    if width <= 0 or height <= 0:
        raise RecordError(f"{where}: width and height must be positive, got {width}x{height}")
    caption = data.get("caption", "") or ""
    if not isinstance(caption, str):
        raise RecordError(f"{where}: field 'caption' must be a string")
    raw_regions = data.get("regions", []) or []
    if not isinstance(raw_regions, list):
        raise RecordError(f"{where}: field 'regions' must be a list")
    regions = []
    for index, raw in enumerate(raw_regions):
        region_where = f"{where}: regions[{index}]"
        if not isinstance(raw, dict):
            raise RecordError(f"{region_where}: expected an object")
        if "box" not in raw:
            raise RecordError(f"{region_where}: missing required field 'box'")
        try:
            box = list(validate_box(raw["box"], where=f"{region_where}.box"))
        except (BoxError, TypeError) as error:
            raise RecordError(str(error)) from error
        expressions = raw.get("expressions", []) or []
        if not isinstance(expressions, list) or not all(isinstance(e, str) for e in expressions):
            raise RecordError(f"{region_where}: 'expressions' must be a list of strings")
        attributes = raw.get("attributes", {}) or {}
        if not isinstance(attributes, dict):
            raise RecordError(f"{region_where}: 'attributes' must be an object")
        category = raw.get("category")
        regions.append(
            Region(
                box=box,
                caption=str(raw.get("caption", "") or ""),
                category=None if category is None else str(category),
                expressions=list(expressions),
                attributes=dict(attributes),
            )
        )
    return RegionTextRecord(
        id=record_id,
        image=image,
        width=width,
        height=height,
        caption=caption,
        regions=regions,
        source=str(data.get("source", "") or ""),
        root=root,
    )


@dataclass
class ReadReport:
    """What :func:`read_region_text` skipped, with reasons (``file:line: message``)."""

    records: int = 0
    skipped: list[str] = field(default_factory=list)
    noun: str = "records"
    """What a record is called in :meth:`summary` (e.g. ``"conversations"``)."""

    def summary(self) -> str:
        return f"{self.records} {self.noun} read, {len(self.skipped)} malformed skipped"


def _jsonl_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"{path}: folder holds no *.jsonl region-text files")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{path}: region-text file not found")
    return [path]


def iter_region_text(
    path: str | os.PathLike[str], *, strict: bool = False, report: ReadReport | None = None
) -> Iterator[RegionTextRecord]:
    """Yield records from a JSONL file or a folder of JSONL shards.

    Malformed lines raise :class:`RecordError` when ``strict``; otherwise they are skipped and listed in ``report``.
    """
    report = report if report is not None else ReadReport()
    for file in _jsonl_files(Path(path)):
        with open(file, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{file}:{line_number}"
                try:
                    try:
                        data = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise RecordError(f"{where}: invalid JSON ({error.msg})") from error
                    record = parse_record(data, where=where, root=file.parent)
                except RecordError as error:
                    if strict:
                        raise
                    report.skipped.append(str(error))
                    continue
                report.records += 1
                yield record


def read_region_text(
    path: str | os.PathLike[str], *, strict: bool = False, report: ReadReport | None = None
) -> list[RegionTextRecord]:
    """Read all records of a JSONL file or folder of shards (see :func:`iter_region_text`)."""
    return list(iter_region_text(path, strict=strict, report=report))


@contextlib.contextmanager
def _atomic_text_file(path: Path) -> Iterator[TextIO]:
    """A UTF-8 text handle on :func:`atomic_file` (see there)."""
    with atomic_file(path, binary=False) as handle:
        yield handle


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, binary: bool = True) -> Iterator[Any]:
    """A handle (bytes, or UTF-8 text when not ``binary``) on a new temporary file next to ``path``, renamed over
    ``path`` (after fsync) when the block ends without error and removed when it raises: readers see the old file
    or the new one, never a torn one. (Tar shards are written through it too.)

    The temporary file is created with ``os.open(..., 0o666)``, so the kernel applies the process umask (and any
    default ACL) exactly as for a plain ``open(path, "w")``; nothing reads or changes the umask, which is
    process-global and would race with other threads. When ``path`` already exists its permission bits are kept,
    as ``open(path, "w")`` keeps them. (``tempfile`` would give 0600, hiding checkpoints and shards from the other
    users of a cluster.)
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    options: dict[str, Any] = {"mode": "wb"} if binary else {"mode": "w", "encoding": "utf-8"}
    try:
        with open(descriptor, **options) as handle:
            with contextlib.suppress(FileNotFoundError):
                os.chmod(temporary, stat.S_IMODE(os.stat(path).st_mode))
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: a temporary file in the same folder, fsync, ``os.replace``.
    Readers see the old file or the new one, never a torn one; the new file gets the mode a plain ``open`` would
    give (see :func:`_atomic_text_file`)."""
    with _atomic_text_file(Path(path)) as handle:
        handle.write(text)


def write_region_text(records: Iterable[RegionTextRecord], path: str | os.PathLike[str]) -> int:
    """Write records to ``path`` atomically (as :func:`atomic_write_text`). Returns the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with _atomic_text_file(path) as handle:
        for record in records:
            handle.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
            count += 1
    return count


def record_from_dict(data: dict[str, Any]) -> RegionTextRecord:
    """Build a record from a plain dict (already validated or trusted); convenience for converters."""
    return parse_record(data)


__all__ = [
    "FORMAT_VERSION",
    "ReadReport",
    "RecordError",
    "Region",
    "RegionTextRecord",
    "atomic_file",
    "atomic_write_text",
    "iter_region_text",
    "parse_record",
    "read_region_text",
    "record_from_dict",
    "write_region_text",
]
