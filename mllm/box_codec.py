"""Box ⇄ text codecs: how a box is written in prompts and answers, and read back from model output.

Every box here is ``xyxy`` normalised to ``[0, 1]`` by the **original** image's width and height (the project's
convention, see DESIGN.md); the text of a box never depends on the model's resize or padding.

Codecs, keyed by the config value ``CLOCLlavaConfig.box_codec``:

- ``"int999"`` (default, Ferret's format): ``[x1, y1, x2, y2]`` integers on a 0–999 grid per axis. A coordinate
  ``v`` is written as ``round(v · 999)`` and read back as ``i / 999``, so 0 and 1 are the grid's ends and a round
  trip is within half a grid cell (``0.5 / 999``).
- ``"float"`` (Shikra, lmms-eval's REC tasks): ``[0.123, 0.456, 0.789, 0.999]`` with 3 decimals; a round trip is
  within ``0.0005``.

Reading is forgiving about which codec wrote a box: a box whose numbers have a decimal point (``[0.12, 0.3, 0.5,
0.9]``, the float codec's and LLaVA-1.5's format) is read as 0–1 floats whatever the model's codec, since a model
trained with several wordings (:data:`mllm.prompts.WORDINGS`) answers a prompt that asks for floats in floats;
integers are read on the codec's grid.

Parsing model output never raises. A bracketed group of exactly four finite numbers is a box; anything else is
skipped (``parse_boxes`` → ``[]``, ``parse_first_box`` → ``None``). A parsed box is cleaned, not rejected:
coordinates are clipped to ``[0, 1]`` and inverted corners are swapped so that ``x1 <= x2`` and ``y1 <= y2``
(a zero-width or zero-height box is kept; its IoU with anything is 0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

Box = tuple[float, float, float, float]

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
BOX_PATTERN = re.compile(rf"\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]")
"""A bracketed group of four numbers, ``[a, b, c, d]``; what every codec writes and reads."""

MAX_PARSE_CHARS = 100_000
"""Model output longer than this is cut before parsing (bounds the cost of parsing garbage)."""


def _clean(values: Sequence[float]) -> Box | None:
    """Clip to ``[0, 1]`` and order corners; ``None`` when a value is not finite."""
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        return None
    x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in values)
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def _is_fractional(number: str) -> bool:
    """Whether a written number has a decimal point or an exponent (``"0.25"``, ``"1e-1"``), unlike a grid integer."""
    return any(mark in number for mark in ".eE")


@dataclass(frozen=True)
class BoxCodec:
    """Writes normalised original-frame boxes as text and reads them back.

    Attributes:
        name: registry key (the config value).
        scale: a coordinate ``v`` in ``[0, 1]`` is written as ``v · scale``.
        decimals: decimals written (0 = integers).
    """

    name: str
    scale: float
    decimals: int

    @property
    def pattern(self) -> re.Pattern[str]:
        """Regex matching one written box (four numbers in brackets)."""
        return BOX_PATTERN

    @property
    def cell(self) -> float:
        """Grid step in normalised units; a round trip is within half of it."""
        return 10.0**-self.decimals / self.scale

    def encode(self, box: Sequence[float]) -> str:
        """``[x1, y1, x2, y2]`` normalised original-frame box → text such as ``"[12, 340, 560, 999]"``.

        Values are clipped to ``[0, 1]`` (round-off from pixel conversions); non-finite values raise ``ValueError``.
        """
        values = [float(v) for v in box]
        if len(values) != 4 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"{self.name} box codec: expected 4 finite numbers [x1, y1, x2, y2], got {list(box)!r}")
        clipped = [min(max(v, 0.0), 1.0) * self.scale + 0.0 for v in values]  # + 0.0: no '-0'
        return "[" + ", ".join(f"{v:.{self.decimals}f}" for v in clipped) + "]"

    def decode_match(self, match: re.Match[str]) -> Box | None:
        """One :data:`BOX_PATTERN` match → cleaned normalised box, or ``None`` when it is not a valid box."""
        groups = match.groups()
        scale = 1.0 if any(_is_fractional(group) for group in groups) else self.scale
        try:
            values = [float(group) / scale for group in groups]
        except (ValueError, OverflowError):
            return None
        return _clean(values)

    def parse_boxes(self, text: object) -> list[Box]:
        """Every box written in ``text`` (normalised original frame), in order. Never raises."""
        if not isinstance(text, str):
            return []
        boxes = []
        for match in BOX_PATTERN.finditer(text[:MAX_PARSE_CHARS]):
            box = self.decode_match(match)
            if box is not None:
                boxes.append(box)
        return boxes

    def parse_first_box(self, text: object) -> Box | None:
        """The first box written in ``text``, or ``None`` ("no box"). Never raises."""
        if not isinstance(text, str):
            return None
        for match in BOX_PATTERN.finditer(text[:MAX_PARSE_CHARS]):
            box = self.decode_match(match)
            if box is not None:
                return box
        return None


BOX_CODECS: dict[str, BoxCodec] = {
    "int999": BoxCodec(name="int999", scale=999.0, decimals=0),
    "float": BoxCodec(name="float", scale=1.0, decimals=3),
}
DEFAULT_BOX_CODEC = "int999"


def get_box_codec(name: str | BoxCodec = DEFAULT_BOX_CODEC) -> BoxCodec:
    """The codec registered under ``name`` (a :class:`BoxCodec` passes through)."""
    if isinstance(name, BoxCodec):
        return name
    if name not in BOX_CODECS:
        raise ValueError(f"unknown box codec {name!r}; choose one of {sorted(BOX_CODECS)}")
    return BOX_CODECS[name]


def encode_box(box: Sequence[float], codec: str | BoxCodec = DEFAULT_BOX_CODEC) -> str:
    """Normalised original-frame ``xyxy`` → text with the named codec."""
    return get_box_codec(codec).encode(box)


def parse_boxes(text: object, codec: str | BoxCodec = DEFAULT_BOX_CODEC) -> list[Box]:
    """All boxes in ``text`` with the named codec; never raises on the text (an unknown codec name does)."""
    return get_box_codec(codec).parse_boxes(text)


def parse_first_box(text: object, codec: str | BoxCodec = DEFAULT_BOX_CODEC) -> Box | None:
    """The first box in ``text``, or ``None``; never raises on the text (an unknown codec name does)."""
    return get_box_codec(codec).parse_first_box(text)


__all__ = [
    "BOX_CODECS",
    "BOX_PATTERN",
    "DEFAULT_BOX_CODEC",
    "Box",
    "BoxCodec",
    "encode_box",
    "get_box_codec",
    "parse_boxes",
    "parse_first_box",
]
