"""The ``regions`` extension on a rendered prompt: which box each ``<region>`` token gets (no vLLM import).

:mod:`serve.api` (through :meth:`serve.engine.ChatEngine.expand_regions`) lets a user message refer to box ``k`` of
the request's ``regions`` as ``[region{k}]`` and writes it as ``[x1, y1, x2, y2] <region>`` in the model's box
codec. The vLLM plugin receives the prompt after vLLM's chat template, so it applies the same rule to the whole
rendered prompt text, with the same box checks (:func:`serve.boxes.check_box`) and the same text
(:meth:`mllm.CLOCLlavaProcessor.format_region`):

- if the text has ``[regionK]`` references, ``regions`` is the list they index (``serve.api``'s rule); a
  ``<region>`` already written after its box text keeps the box read from that text;
- otherwise ``regions`` gives the boxes of the text's ``<region>`` tokens, in order, one per token
  (``CLOCLlavaProcessor(boxes=...)``'s rule); without ``regions`` each ``<region>`` takes the box written before it.

Boxes are normalised ``xyxy`` in the **original** image frame; the processor maps them to the model frame.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from mllm.box_codec import BOX_PATTERN
from serve import InputError
from serve.boxes import Box, check_box

REFERENCE_PATTERN = re.compile(r"\[\s*[Rr]egion\s*(?P<index>\d+)\s*\]")
"""``[region0]``, ``[Region 1]``, ...: how a message refers to box ``k`` of ``regions``."""


def parse_regions(value: Any) -> list[Box]:
    """The request's ``regions`` value → checked normalised boxes (:func:`serve.boxes.check_box`: 4 finite
    numbers, clipped to the image, not empty). Raises :class:`~serve.InputError` saying what is wrong."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise InputError(f"'regions' must be a list of [x1, y1, x2, y2] boxes (normalised), got {value!r}")
    return [check_box(box, where=f"regions[{k}]") for k, box in enumerate(value)]


def resolve_regions(text: str, regions: Sequence[Box], processor: Any) -> tuple[str, list[Box]]:
    """Apply the ``regions`` rule to a rendered prompt (see the module docstring).

    Args:
        text: the prompt text (after the chat template); special tokens written as text.
        regions: checked boxes from :func:`parse_regions`.
        processor: a :class:`~mllm.CLOCLlavaProcessor` (its ``region_token``, ``codec`` and ``format_region``).

    Returns:
        The text with every ``[regionK]`` written as ``[x1, y1, x2, y2] <region>``, and the box of each
        ``<region>`` token of that text, in order.

    Raises:
        InputError: an unknown ``[regionK]``, more or fewer ``<region>`` tokens than ``regions`` (when they give
            the boxes), or a ``<region>`` with neither a box in ``regions`` nor box text before it.
    """
    token = re.escape(processor.region_token)
    if REFERENCE_PATTERN.search(text):
        pattern = re.compile(
            rf"(?P<ref>{REFERENCE_PATTERN.pattern})|(?P<box>{BOX_PATTERN.pattern})\s*{token}|(?P<bare>{token})"
        )
        boxes: list[Box] = []

        def replace(match: re.Match[str]) -> str:
            if match.group("bare"):
                raise InputError(
                    f"{processor.region_token} must follow its box, as in '[120, 40, 560, 900] "
                    f"{processor.region_token}'; or write [region0] and pass the box in regions"
                )
            if match.group("ref"):
                index = int(match.group("index"))
                if index >= len(regions):
                    given = f"region0..region{len(regions) - 1}" if regions else "none"
                    raise InputError(f"{match.group('ref')} refers to an unknown region; regions given: {given}")
                box = regions[index]
            else:
                parsed = processor.codec.parse_first_box(match.group("box"))
                box = check_box(parsed if parsed is not None else (), where=match.group("box"))
            boxes.append(box)
            return processor.format_region(box)

        return pattern.sub(replace, text), boxes

    count = len(re.findall(token, text))
    if regions:
        if count != len(regions):
            raise InputError(
                f"the prompt has {count} {processor.region_token} tokens but {len(regions)} regions were given; "
                f"pass one box per {processor.region_token}, or refer to them as [region0], [region1], ..."
            )
        return text, list(regions)
    boxes = []
    for k, match in enumerate(re.finditer(rf"(?:(?P<box>{BOX_PATTERN.pattern})\s*)?{token}", text)):
        parsed = processor.codec.parse_first_box(match.group("box")) if match.group("box") else None
        if parsed is None:
            raise InputError(
                f"{processor.region_token} #{k} has no box: no regions were given and no box text like "
                f"'[120, 40, 560, 900]' precedes it (pass regions, or refer to them as [region0], ...)"
            )
        boxes.append(check_box(parsed, where=f"{processor.region_token} #{k}"))
    return text, boxes


__all__ = ["REFERENCE_PATTERN", "parse_regions", "resolve_regions"]
