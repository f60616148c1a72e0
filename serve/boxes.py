"""Boxes at the edges of the chat front ends: user regions in, grounded boxes out, and drawing both.

Every box here is ``xyxy`` normalised to ``[0, 1]`` by the **original** image's width and height (DESIGN.md);
pixels appear only where a user types them (:func:`parse_region_spec`) or reads them (:meth:`GroundedBox.pixels`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from mllm.box_codec import BOX_PATTERN, BoxCodec
from serve import InputError

Box = tuple[float, float, float, float]

BOX_COLOUR = (230, 40, 40)
"""Outline colour of grounded boxes (the model's answers)."""
REGION_COLOUR = (30, 144, 255)
"""Outline colour of user regions (the question's boxes)."""
MAX_PHRASE_WORDS = 12

_CLAUSE_BREAK = re.compile(r"[.!?;:,()\n]")
_DETERMINERS = frozenset({"the", "a", "an", "this", "that", "these", "those"})
_LEADING_FILLER = frozenset({"and", "or", "but", "with", "while", "then", "also"})
_TRAILING_FILLER = frozenset({"at", "in", "on", "is", "are", "was", "were", "be", "located"})


@dataclass(frozen=True)
class GroundedBox:
    """A box in an answer: ``box`` normalised original-frame ``xyxy``; ``phrase`` the words the box grounds
    (see :func:`grounded_boxes`; ``""`` when the answer is only the box)."""

    phrase: str
    box: Box

    def pixels(self, image_size: tuple[int, int]) -> Box:
        """The box in pixels of an image of ``(width, height)``."""
        return to_pixels(self.box, image_size)


def to_pixels(box: Sequence[float], image_size: tuple[int, int]) -> Box:
    """Normalised ``xyxy`` → pixel ``xyxy`` for an image of ``(width, height)``."""
    width, height = image_size
    x1, y1, x2, y2 = box
    return (x1 * width, y1 * height, x2 * width, y2 * height)


EDGE_TOLERANCE = 1e-6
"""How far past the image's border (in normalised units) a coordinate may lie and still count as on it: rounding in
a client's pixel → normalised conversion, never a real overshoot. Such values are snapped to the border."""

BOX_FORMATS = ("normalized", "normalised", "pixels")
"""Values of the API's ``box_format`` field: normalised ``xyxy`` (the default; both spellings) or pixel ``xyxy``."""


def _four_numbers(box: object, where: str) -> list[float]:
    """The 4 finite numbers of ``box``, or :class:`~serve.InputError` naming ``where``."""
    values: list[float] = []
    if isinstance(box, Iterable) and not isinstance(box, (str, bytes)):
        try:
            values = [float(v) for v in box]
        except (TypeError, ValueError):
            values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise InputError(f"{where}: a box is 4 finite numbers [x1, y1, x2, y2], got {box!r}")
    return values


def _shown(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def check_box(box: Sequence[float], where: str = "region", hint: str = "") -> Box:
    """A user's normalised box, checked: 4 finite numbers in ``[0, 1]``, corners put in order, non-zero area.

    A box reaching outside the image is refused, never clipped: a client sending pixels, or another convention,
    would otherwise get a different region without a word. Raises :class:`~serve.InputError` naming ``where`` and
    the box (``hint`` is appended to the message of a box outside ``[0, 1]``).
    """
    values = _four_numbers(box, where)
    if not all(-EDGE_TOLERANCE <= v <= 1 + EDGE_TOLERANCE for v in values):
        raise InputError(
            f"{where}: box {_shown(values)} is not inside the image: a normalised box is xyxy with every value in "
            f"[0, 1] (fractions of the image's width and height){hint}"
        )
    snapped = [min(max(v, 0.0), 1.0) for v in values]
    x1, x2 = sorted(snapped[0::2])
    y1, y2 = sorted(snapped[1::2])
    if not (x1 < x2 and y1 < y2):
        raise InputError(f"{where}: box {_shown(values)} has zero area (x1 = x2 or y1 = y2)")
    return (x1, y1, x2, y2)


def pixel_box(box: Sequence[float], image_size: tuple[int, int], where: str = "region") -> Box:
    """A pixel ``xyxy`` box of an image of ``(width, height)`` → a checked normalised box (:func:`check_box`).

    Raises :class:`~serve.InputError` naming ``where``, the box and the image size when the box reaches outside
    the image or has zero area."""
    values = _four_numbers(box, where)
    width, height = image_size
    tolerance = EDGE_TOLERANCE * max(width, height)
    inside = all(-tolerance <= v <= width + tolerance for v in values[0::2]) and all(
        -tolerance <= v <= height + tolerance for v in values[1::2]
    )
    if not inside:
        raise InputError(
            f"{where}: pixel box {_shown(values)} is not inside the {width}x{height} image "
            f"(x in [0, {width}], y in [0, {height}])"
        )
    return check_box([values[0] / width, values[1] / height, values[2] / width, values[3] / height], where=where)


def normalise_boxes(
    boxes: Sequence[Sequence[float]],
    box_format: str = "normalized",
    image_size: tuple[int, int] | None = None,
    where: str = "regions",
) -> list[Box]:
    """Check a request's boxes and return them normalised: ``box_format`` ``"normalized"`` (or ``"normalised"``)
    boxes must lie in ``[0, 1]``; ``"pixels"`` boxes are converted by ``image_size`` ``(width, height)`` and must lie
    inside the image. Box ``k`` is named ``{where}[k]`` in errors (:class:`~serve.InputError`)."""
    if box_format not in BOX_FORMATS:
        raise InputError(f"box_format {box_format!r} is not supported; use 'normalized' (the default) or 'pixels'")
    if box_format == "pixels":
        if image_size is None:
            raise InputError("box_format 'pixels' needs an image to measure the boxes against")
        return [pixel_box(box, image_size, f"{where}[{k}]") for k, box in enumerate(boxes)]
    hint = '; to send pixel boxes, add "box_format": "pixels" to the request'
    return [check_box(box, f"{where}[{k}]", hint=hint) for k, box in enumerate(boxes)]


def parse_region_spec(spec: str | Sequence[float], image_size: tuple[int, int]) -> Box:
    """A box typed by a user, in pixels or normalised, → a checked normalised box.

    ``spec`` is ``"[x1, y1, x2, y2]"`` (brackets optional; commas or spaces) or 4 numbers. The rule: when every
    value is at most 1 the box is normalised (``[0, 0, 1, 1]`` is the whole image; :func:`check_box`), otherwise it
    is in pixels of the ``(width, height)`` image (:func:`pixel_box`). A box reaching outside the image is refused,
    not clipped. Raises :class:`~serve.InputError` for anything else.
    """
    if isinstance(spec, str):
        parts = [p for p in re.split(r"[\s,]+", spec.strip().strip("[]()").strip()) if p]
    else:
        parts = list(spec)
    try:
        values = [float(p) for p in parts]
    except (TypeError, ValueError) as error:
        raise InputError(f"region {spec!r}: expected 4 numbers [x1, y1, x2, y2]") from error
    if len(values) != 4:
        raise InputError(f"region {spec!r}: expected 4 numbers [x1, y1, x2, y2], got {len(values)}")
    where = f"region {spec!r}" if isinstance(spec, str) else "region"
    if max(values) <= 1:
        return check_box(values, where=where)
    return pixel_box(values, image_size, where=where)


def _phrase(segment: str) -> str:
    """The phrase a box grounds, from the text between the previous box (or the start) and this box."""
    words = _CLAUSE_BREAK.split(segment)[-1].split()
    while words and words[-1].lower() in _TRAILING_FILLER:
        words.pop()
    while words and words[0].lower() in _LEADING_FILLER:
        words.pop(0)
    first_determiner = next((i for i, word in enumerate(words) if word.lower() in _DETERMINERS), 0)
    return " ".join(words[first_determiner:][-MAX_PHRASE_WORDS:])


def grounded_boxes(answer: str, codec: BoxCodec) -> list[GroundedBox]:
    """Every box written in ``answer`` (parsed by ``codec``, never raises) with the phrase it grounds.

    The phrase heuristic: take the text between the previous box (or the start of the answer) and this box; keep
    what follows the last clause break (``. ! ? ; : , ( )`` or a newline); drop trailing filler (``at``, ``in``,
    ``is``, ``located``, ...) and leading conjunctions (``and``, ``with``, ...); start at the first determiner
    (``a``/``an``/``the``/``this``/...) when there is one; keep at most 12 words. So ``"There is a red circle
    [..] and the square [..]"`` gives ``"a red circle"`` and ``"the square"``; an answer that is only a box gives
    ``""``.
    """
    found: list[GroundedBox] = []
    previous_end = 0
    for match in BOX_PATTERN.finditer(answer if isinstance(answer, str) else ""):
        box = codec.decode_match(match)
        if box is not None:
            found.append(GroundedBox(_phrase(answer[previous_end : match.start()]), box))
        previous_end = match.end()
    return found


def _font(image_size: tuple[int, int]) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(10, round(min(image_size) / 32)))


def _outline(
    draw: ImageDraw.ImageDraw,
    box: Sequence[float],
    label: str,
    colour: tuple[int, int, int],
    size: tuple[int, int],
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
) -> None:
    x1, y1, x2, y2 = to_pixels(box, size)
    line = max(1, round(min(size) / 160))
    draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=line)
    if label:
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        text_w, text_h = right - left, bottom - top
        tx, ty = x1, y1 - text_h - 2 if y1 - text_h - 2 >= 0 else y1
        draw.rectangle((tx, ty, tx + text_w + 2, ty + text_h + 2), fill=colour)
        draw.text((tx + 1 - left, ty + 1 - top), label, fill=(255, 255, 255), font=font)


def draw_boxes(
    image: Image.Image, boxes: Sequence[GroundedBox], regions: Sequence[Sequence[float]] = ()
) -> Image.Image:
    """A copy of ``image`` with grounded ``boxes`` (red, labelled with their phrase, else ``box N``) and user
    ``regions`` (blue, labelled ``region N``); all boxes normalised original-frame ``xyxy``."""
    out = image.convert("RGB")  # convert() copies
    draw = ImageDraw.Draw(out)
    font = _font(out.size)
    for index, region in enumerate(regions):
        _outline(draw, region, f"region{index}", REGION_COLOUR, out.size, font)
    for index, grounded in enumerate(boxes):
        _outline(draw, grounded.box, grounded.phrase or f"box {index + 1}", BOX_COLOUR, out.size, font)
    return out


__all__ = [
    "BOX_COLOUR",
    "BOX_FORMATS",
    "EDGE_TOLERANCE",
    "REGION_COLOUR",
    "Box",
    "GroundedBox",
    "check_box",
    "draw_boxes",
    "grounded_boxes",
    "normalise_boxes",
    "parse_region_spec",
    "pixel_box",
    "to_pixels",
]
