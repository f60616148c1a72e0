"""Boxes go through the same transform as the pixels: property tests of the preprocessing frame map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cloc_encoder.image_processing import CLOCImageProcessor, RegionOutsideInputError

LAYOUTS = [("pad", "center"), ("pad", "top_left"), ("squash", "center")]


@st.composite
def normalized_boxes(draw: st.DrawFn) -> list[float]:
    x1, x2 = sorted(draw(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2, unique=True)))
    y1, y2 = sorted(draw(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2, unique=True)))
    return [x1, y1, x2, y2]


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 5000),
    height=st.integers(1, 5000),
    image_size=st.sampled_from([32, 224, 336, 384, 1024]),
    layout=st.sampled_from(LAYOUTS),
    box=normalized_boxes(),
)
def test_box_to_model_and_back_is_identity_within_a_pixel(width, height, image_size, layout, box):
    resize_mode, pad_position = layout
    processor = CLOCImageProcessor(image_size=image_size, resize_mode=resize_mode, pad_position=pad_position)
    transform = processor.frame_transform(width, height)
    model_box = transform.boxes_to_model([box])
    assert ((model_box >= 0) & (model_box <= 1)).all()
    back = transform.boxes_to_original(model_box)[0]
    error_pixels = (back.double() - torch.tensor(box, dtype=torch.float64)).abs() * torch.tensor(
        [width, height, width, height], dtype=torch.float64
    )
    assert float(error_pixels.max()) <= 1.0, (back.tolist(), box)


@settings(max_examples=200, deadline=None)
@given(width=st.integers(8, 3000), height=st.integers(8, 3000), box=normalized_boxes())
def test_crop_mode_round_trips_boxes_inside_the_crop(width, height, box):
    processor = CLOCImageProcessor(image_size=224, resize_mode="crop")
    transform = processor.frame_transform(width, height)
    model_box = transform.boxes_to_model([box])[0]
    inside = transform.boxes_to_original([[0.0, 0.0, 1.0, 1.0]])[0]  # the crop, in the original frame
    clipped = torch.tensor(box).clamp(min=inside[:2].repeat(2), max=inside[2:].repeat(2))
    back = transform.boxes_to_original(model_box[None])[0]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    assert float(((back - clipped).abs() * scale).max()) <= 1.0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", [(200, 120), (90, 300), (64, 64), (517, 233)])
def test_mapped_box_lands_on_the_drawn_pixels(layout, size):
    """Draw a white rectangle, preprocess, find it in the model input: it must be where the box map says."""
    width, height = size
    resize_mode, pad_position = layout
    rng = np.random.default_rng(width * 7 + height)
    for _ in range(5):
        x1, x2 = sorted(rng.choice(np.arange(width + 1), 2, replace=False))
        y1, y2 = sorted(rng.choice(np.arange(height + 1), 2, replace=False))
        if min(x2 - x1, y2 - y1) < max(width, height) / 12:  # a few model pixels wide at least
            continue
        canvas = np.zeros((height, width, 3), np.uint8)
        canvas[y1:y2, x1:x2] = 255
        processor = CLOCImageProcessor(
            image_size=64, resize_mode=resize_mode, pad_position=pad_position, image_mean=(0, 0, 0), image_std=(1, 1, 1)
        )
        box = [x1 / width, y1 / height, x2 / width, y2 / height]
        batch = processor(Image.fromarray(canvas), boxes=[box])
        rows, cols = np.nonzero(batch["pixel_values"][0, 0].numpy() > 0.5)
        found = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]) / 64
        expected = batch["boxes"][0][0].numpy()
        assert np.abs(found - expected).max() * 64 <= 1.5, (found * 64, expected * 64)


@pytest.mark.parametrize("size", [(337, 336), (500, 333), (333, 500), (1001, 700)])
def test_crop_mode_matches_clip_image_processor(size):
    """``resize_mode="crop"`` reproduces CLIPImageProcessor (LLaVA-1.5's preprocessing): same resize rounding and
    crop offset, pixel values within one 8-bit level (PIL vs torchvision bicubic)."""
    from transformers import CLIPImageProcessor

    width, height = size
    image = Image.fromarray(np.random.default_rng(width).integers(0, 255, (height, width, 3), dtype=np.uint8))
    reference = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    expected = reference(image, return_tensors="pt")["pixel_values"][0]
    ours = CLOCImageProcessor(image_size=336, resize_mode="crop")(image)["pixel_values"][0]
    level = 1 / 255 / min(ours_std for ours_std in reference.image_std)
    assert (ours - expected).abs().max().item() <= 1.01 * level
    assert (ours - expected).abs().mean().item() < 1e-3


def test_a_region_cut_away_by_the_crop_is_an_error_not_a_zero_area_box():
    """Centre crop of a 200×50 image to 32 px keeps x in [0.375, 0.625] of the original width."""
    transform = CLOCImageProcessor(image_size=32, resize_mode="crop").frame_transform(200, 50)
    assert transform.boxes_to_model([[0.0, 0.0, 0.1, 1.0]]).tolist() == [[0.0, 0.0, 0.0, 1.0]]  # the silent clip
    with pytest.raises(RegionOutsideInputError, match=r"region 1: box \[0.0, 0.0, 0.1, 1.0\] lies outside"):
        transform.region_boxes_to_model([[0.4, 0.1, 0.6, 0.9], [0.0, 0.0, 0.1, 1.0]])
    with pytest.raises(RegionOutsideInputError, match="region 0"):  # a point outside the crop
        transform.region_boxes_to_model([[0.9, 0.5, 0.9, 0.5]])
    partly = transform.region_boxes_to_model([[0.3, 0.2, 0.5, 0.8], [0.5, 0.5, 0.5, 0.5]])  # clipped / a point
    torch.testing.assert_close(partly, transform.boxes_to_model([[0.3, 0.2, 0.5, 0.8], [0.5, 0.5, 0.5, 0.5]]))
    assert partly[0, 0] == 0.0 and partly[0, 2] > 0.0
    padded = CLOCImageProcessor(image_size=32).frame_transform(200, 50)  # nothing is cut away with padding
    torch.testing.assert_close(
        padded.region_boxes_to_model([[0.0, 0.0, 0.1, 1.0]]), padded.boxes_to_model([[0, 0, 0.1, 1]])
    )
