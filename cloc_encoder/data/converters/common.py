"""Pieces shared by the data-set converters: errors, the skip report, JSON loading, box and image-path helpers.

Coordinate frames: source files give boxes in **pixels of the original image** (COCO/VG ``[x, y, w, h]``); the
converters emit the project's convention, ``xyxy`` normalised to ``[0, 1]`` by the original width and height
(see :mod:`cloc_encoder.boxes`).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloc_encoder.boxes import BoxError, validate_box
from cloc_encoder.data.format import RegionTextRecord, write_region_text

NUMBER = (int, float)

PIXEL_TOLERANCE = 1.0
"""Boxes may overflow the image by up to this many pixels (rounding in the source annotations); they are clipped."""


class ConversionError(ValueError):
    """A source annotation file with the wrong schema; the message names the file and the key at fault."""


class MissingInputError(ConversionError, FileNotFoundError):
    """A source file or folder that does not exist; the message names the path and what file is expected there."""


@dataclass
class ConversionReport:
    """What a converter produced and what it skipped, counted per reason, with a few example messages."""

    source: str
    records: int = 0
    regions: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 20

    def skip(self, reason: str, message: str = "") -> None:
        """Count one skipped item under ``reason`` (a short snake_case key) and keep ``message`` as an example."""
        self.skipped[reason] += 1
        if message and len(self.examples) < self.max_examples:
            self.examples.append(f"{reason}: {message}")

    def summary(self) -> str:
        """A few human-readable lines: totals, then one line per skip reason (most frequent first)."""
        lines = [f"{self.source}: {self.records} records, {self.regions} regions"]
        if self.skipped:
            lines.append(f"skipped {sum(self.skipped.values())} items:")
            lines.extend(f"  {reason}: {count}" for reason, count in self.skipped.most_common())
        if self.examples:
            lines.append("examples:")
            lines.extend(f"  {example}" for example in self.examples)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "records": self.records,
            "regions": self.regions,
            "skipped": dict(self.skipped),
            "examples": list(self.examples),
        }


def require_file(path: str | os.PathLike[str], what: str) -> Path:
    """Return ``path`` as a :class:`Path`, or raise :class:`MissingInputError` saying what file was expected."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: file not found; expected {what}")
    return path


def load_json(path: str | os.PathLike[str], what: str) -> Any:
    """Load a JSON file; a missing file or invalid JSON raises an error naming the path and ``what`` it should be."""
    path = require_file(path, what)
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ConversionError(
                f"{path}: invalid JSON ({error.msg} at line {error.lineno}); expected {what}"
            ) from error


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def check_type(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    """Return ``value`` if it is of ``kind`` (bools are not numbers), else raise :class:`ConversionError`."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ConversionError(f"{where} must be {_kind_name(kind)}, got {type(value).__name__}: {_short(value)}")
    return value


def require(data: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``data[key]`` checked to be of ``kind``; ``where`` is e.g. ``"instances.json: annotations[3]"``."""
    check_type(data, dict, where)
    if key not in data:
        raise ConversionError(f"{where}: missing key '{key}'")
    return check_type(data[key], kind, f"{where}.{key}")


def require_size(data: Any, where: str) -> tuple[int, int]:
    """``(width, height)`` of an image entry: positive whole numbers (``640`` or ``640.0``)."""
    sizes = []
    for key in ("width", "height"):
        value = require(data, key, NUMBER, where)
        if value <= 0 or value != int(value):
            raise ConversionError(f"{where}.{key} must be a positive whole number of pixels, got {value!r}")
        sizes.append(int(value))
    return sizes[0], sizes[1]


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pixel_xyxy_to_normalized(
    box: Iterable[Any], width: int, height: int, *, tolerance: float = PIXEL_TOLERANCE
) -> tuple[list[float] | None, str]:
    """Pixel ``[x1, y1, x2, y2]`` of a ``width`` × ``height`` image → (normalised ``xyxy``, ``""``) or (None, reason).

    Reasons: ``malformed_box`` (not 4 finite numbers), ``degenerate_box`` (zero or negative width/height, also after
    clipping or after the 6-decimal rounding of the output format), ``out_of_range_box`` (beyond the image by more
    than ``tolerance`` pixels). Overflow within ``tolerance`` is clipped to the image.
    """
    values = list(box)
    if len(values) != 4 or not all(isinstance(v, NUMBER) and not isinstance(v, bool) for v in values):
        return None, "malformed_box"
    x1, y1, x2, y2 = (float(v) for v in values)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None, "malformed_box"
    if not (x2 > x1 and y2 > y1):
        return None, "degenerate_box"
    if min(x1, y1) < -tolerance or x2 > width + tolerance or y2 > height + tolerance:
        return None, "out_of_range_box"
    x1, x2 = max(x1, 0.0), min(x2, float(width))
    y1, y2 = max(y1, 0.0), min(y2, float(height))
    normalised = [x1 / width, y1 / height, x2 / width, y2 / height]
    rounded = [round(v, 6) for v in normalised]
    if not (rounded[0] < rounded[2] and rounded[1] < rounded[3]):
        return None, "degenerate_box"
    try:
        return list(validate_box(normalised)), ""
    except BoxError:
        return None, "out_of_range_box"


def pixel_xywh_to_normalized(
    box: Iterable[Any], width: int, height: int, *, tolerance: float = PIXEL_TOLERANCE
) -> tuple[list[float] | None, str]:
    """COCO/VG pixel ``[x, y, w, h]`` → normalised ``xyxy`` (see :func:`pixel_xyxy_to_normalized` for reasons)."""
    values = list(box)
    if len(values) != 4 or not all(isinstance(v, NUMBER) and not isinstance(v, bool) for v in values):
        return None, "malformed_box"
    x, y, w, h = values
    return pixel_xyxy_to_normalized([x, y, x + w, y + h], width, height, tolerance=tolerance)


@dataclass
class ImageLocator:
    """Builds the ``image`` field of a record from a file name.

    ``images_dir`` is where the images are. When ``relative_to`` (the output JSONL's folder) is given, the path is
    written relative to it (absolute if that is impossible), because the format resolves relative paths against
    the JSONL's folder; otherwise ``images_dir/file_name`` is written as given. With ``check`` the file must exist
    (relative ``images_dir`` is then resolved against the current directory).
    """

    images_dir: str | os.PathLike[str] = "images"
    relative_to: str | os.PathLike[str] | None = None
    check: bool = False

    def __call__(self, file_name: str) -> str | None:
        path = Path(self.images_dir) / file_name
        if self.check and not path.is_file():
            return None
        if self.relative_to is None:
            return path.as_posix()
        absolute = os.path.abspath(path)
        try:
            return Path(os.path.relpath(absolute, os.path.abspath(self.relative_to))).as_posix()
        except ValueError:  # different drives on Windows
            return Path(absolute).as_posix()


def write_records(records: Iterable[RegionTextRecord], out: str | os.PathLike[str]) -> int:
    """Write converted records with :func:`cloc_encoder.data.format.write_region_text` (atomic); returns the count."""
    return write_region_text(records, out)


__all__ = [
    "PIXEL_TOLERANCE",
    "ConversionError",
    "ConversionReport",
    "ImageLocator",
    "MissingInputError",
    "check_type",
    "load_json",
    "pixel_xywh_to_normalized",
    "pixel_xyxy_to_normalized",
    "require",
    "require_file",
    "require_size",
    "write_records",
]
