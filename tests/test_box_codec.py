"""Box ⇄ text codecs: round trips within half a grid cell, and parsing that never raises."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mllm.box_codec import BOX_CODECS, encode_box, get_box_codec, parse_boxes, parse_first_box

unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
boxes = st.tuples(unit, unit, unit, unit).map(
    lambda b: (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3]))
)


@pytest.mark.parametrize("name", sorted(BOX_CODECS))
@settings(max_examples=300, deadline=None)
@given(box=boxes)
def test_round_trip_within_half_a_cell(name, box):
    codec = get_box_codec(name)
    text = codec.encode(box)
    parsed = parse_first_box(f"It is at {text}.", name)
    assert parsed is not None
    assert all(abs(a - b) <= codec.cell / 2 + 1e-9 for a, b in zip(parsed, box, strict=True)), (text, parsed, box)
    assert parse_boxes(f"{text} and {text}", name) == [parsed, parsed]


def test_formats():
    assert encode_box([0.0, 0.5, 0.25, 1.0]) == "[0, 500, 250, 999]"
    assert encode_box([0.0, 0.5, 0.25, 1.0], "float") == "[0.000, 0.500, 0.250, 1.000]"
    assert encode_box([-0.0, -1e-9, 1.0 + 1e-9, 1.0]) == "[0, 0, 999, 999]"  # round-off clipped, no "-0"
    assert parse_first_box("[0, 500, 250, 999]") == (0.0, 500 / 999, 250 / 999, 1.0)
    assert parse_first_box("[0.1, 0.2, 0.3, 0.4]", "float") == pytest.approx((0.1, 0.2, 0.3, 0.4))
    with pytest.raises(ValueError, match="4 finite numbers"):
        encode_box([0.1, 0.2, float("nan"), 0.4])
    with pytest.raises(ValueError, match="unknown box codec 'ints'"):
        get_box_codec("ints")


def test_cleaning_rules():
    # Inverted corners are swapped, values clipped to the grid / unit range, non-finite rejected.
    assert parse_first_box("[500, 600, 100, 200]") == pytest.approx((100 / 999, 200 / 999, 500 / 999, 600 / 999))
    assert parse_first_box("[-5, 0, 1000, 1200]") == (0.0, 0.0, 1.0, 1.0)
    assert parse_first_box("[0.2, 0.1, 1.5, 0.3]", "float") == pytest.approx((0.2, 0.1, 1.0, 0.3))
    assert parse_first_box("[1e999, 0, 1, 1]", "float") is None
    # Wrong arity or no brackets is "no box"; a later well-formed box is still found.
    assert parse_first_box("[1, 2, 3] then [4, 5, 6, 7, 8] then (1, 2, 3, 4)") is None
    assert parse_first_box("[1, 2, 3] and [10, 20, 30, 40]") == pytest.approx((10 / 999, 20 / 999, 30 / 999, 40 / 999))
    assert parse_boxes("no box here") == []


@pytest.mark.parametrize("name", sorted(BOX_CODECS))
@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(), st.text(alphabet="[]0123456789.,- e+-"), st.none(), st.integers(), st.binary()))
def test_garbage_never_raises(name, text):
    found = parse_boxes(text, name)
    first = parse_first_box(text, name)
    assert isinstance(found, list)
    assert first == (found[0] if found else None)
    for box in found:
        assert 0.0 <= box[0] <= box[2] <= 1.0 and 0.0 <= box[1] <= box[3] <= 1.0


def test_fractional_boxes_are_floats_whatever_the_codec():
    # A model trained with several wordings answers a prompt that asks for floats in floats (LLaVA-1.5, lmms-eval):
    # a box with decimal points is read on [0, 1] by the int999 codec too; integers stay on the codec's grid.
    assert parse_first_box("[0.12, 0.3, 0.5, 1.0]") == pytest.approx((0.12, 0.3, 0.5, 1.0))
    assert parse_first_box("[0.12, 300, 500, 999]") == (0.12, 1.0, 1.0, 1.0)  # one fractional number: all floats
    assert parse_first_box("[120, 300, 500, 999]") == pytest.approx((120 / 999, 300 / 999, 500 / 999, 1.0))
    assert parse_first_box("[0, 0, 1, 1]", "float") == (0.0, 0.0, 1.0, 1.0)
    for box in ((0.1, 0.2, 0.3, 0.4), (0.0, 0.0, 1.0, 1.0)):
        assert parse_first_box(encode_box(box, "float")) == pytest.approx(box)
