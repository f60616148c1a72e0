"""``region_feature="roi_align"``: the ``<region>`` feature is the feature layer's patch tokens RoI-aligned over the
box (the CLIP baseline of Ferret / GLaMM; issue 12 §1). Geometry in fp32, the prompter unused, saved with the model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForImageTextToText

from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
from mllm.modeling_cloc_llava import ROI_ALIGN_OUTPUT_SIZE, roi_align_patch_features
from mllm.tiny import tiny_config
from tests.numerics import assert_close_across_instances

SIDE = 4  # the tiny tower's patch grid: 32-px images, 8-px patches


def _grid_tokens(grid: torch.Tensor) -> torch.Tensor:
    """``(B, W, side, side)`` → ``(B, side², W)`` patch tokens in row-major grid order (as a ViT flattens them)."""
    return grid.flatten(2).transpose(1, 2)


def _patch_box(row: int, col: int, side: int = SIDE) -> list[float]:
    """The model-frame box covering exactly patch ``(row, col)``."""
    return [col / side, row / side, (col + 1) / side, (row + 1) / side]


def _linear_grid(width: int = 6) -> torch.Tensor:
    """``(1, W, SIDE, SIDE)``: every channel an affine function of (row, col) with its own slopes."""
    positions = torch.arange(SIDE, dtype=torch.float32)
    rows, cols = torch.meshgrid(positions, positions, indexing="ij")
    slopes = torch.randn(width, 3, generator=torch.Generator().manual_seed(0))
    return (slopes[:, :1, None] + slopes[:, 1:2, None] * rows + slopes[:, 2:3, None] * cols).unsqueeze(0)


# ----- (a) the geometry ----------------------------------------------------------------------------------------------


def test_box_covering_one_patch_gives_that_patch():
    """On a feature map affine in the patch position the bilinear samples around a patch's centre average to
    exactly that patch's feature, for every interior patch (x is the column, y the row)."""
    grid = _linear_grid()
    tokens = _grid_tokens(grid)
    for row in range(1, SIDE - 1):
        for col in range(1, SIDE - 1):
            box = torch.tensor([_patch_box(row, col)])
            features = roi_align_patch_features(tokens, box, torch.zeros(1, dtype=torch.long))
            torch.testing.assert_close(features[0], grid[0, :, row, col], atol=1e-5, rtol=0)


def test_one_patch_box_on_random_features_is_that_patch_blurred_by_half_a_bin():
    """On arbitrary features the 2×2 bins sample a quarter patch either side of the centre: the patch weighs 3/4 per
    axis and each neighbour 1/8 (an edge patch keeps its outer samples: 7/8). The patch dominates its box."""
    assert ROI_ALIGN_OUTPUT_SIZE == 2
    grid = torch.randn(2, 5, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    tokens = _grid_tokens(grid)
    inner = torch.tensor([1 / 8, 3 / 4, 1 / 8])
    for image, (row, col) in ((0, (1, 2)), (1, (2, 1))):
        box = torch.tensor([_patch_box(row, col)])
        features = roi_align_patch_features(tokens, box, torch.tensor([image]))[0]
        window = grid[image, :, row - 1 : row + 2, col - 1 : col + 2]
        expected = torch.einsum("cyx,y,x->c", window, inner, inner)
        torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
        distances = (tokens[image] - features).norm(dim=-1)
        assert int(distances.argmin()) == row * SIDE + col
    corner = roi_align_patch_features(tokens, torch.tensor([_patch_box(0, 0)]), torch.tensor([0]))[0]
    edge = torch.tensor([7 / 8, 1 / 8])
    torch.testing.assert_close(corner, torch.einsum("cyx,y,x->c", grid[0, :, :2, :2], edge, edge), atol=1e-5, rtol=0)


def test_whole_image_box_on_an_affine_map_is_the_centre_value():
    grid = _linear_grid()
    features = roi_align_patch_features(_grid_tokens(grid), torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0]))
    centre = grid[0, :, 1:3, 1:3].mean(dim=(1, 2))  # the affine map at the grid's centre
    torch.testing.assert_close(features[0], centre, atol=1e-5, rtol=0)


def test_non_square_grid_is_refused():
    with pytest.raises(ValueError, match="square patch grid"):
        roi_align_patch_features(torch.zeros(1, 6, 4), torch.zeros(1, 4), torch.zeros(1, dtype=torch.long))


# ----- the model -----------------------------------------------------------------------------------------------------


def _image(seed: int, size: int = 32) -> Image.Image:
    pixels = torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _prompt(processor: CLOCLlavaProcessor, boxes: list[list[float]]) -> str:
    regions = " and ".join(processor.format_region(box) for box in boxes)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"What is {regions}?"}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True) + " A red circle.</s>"


@pytest.fixture()
def roi_model(chat_tokenizer) -> tuple[CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor]:
    torch.manual_seed(0)
    config = tiny_config(chat_tokenizer, region_feature="roi_align")
    model = CLOCLlavaForConditionalGeneration(config).eval()
    return model, CLOCLlavaProcessor.from_model_config(config, chat_tokenizer)


BOXES = [[[0.1, 0.2, 0.6, 0.7], [0.5004, 0.3001, 0.9, 0.95]], [[0.0, 0.0, 1.0, 1.0]]]


def _inputs(processor: CLOCLlavaProcessor) -> dict:
    texts = [_prompt(processor, boxes) for boxes in BOXES]
    return processor(images=[_image(0), _image(1)], text=texts, padding=True)


def test_config_width_and_validation(chat_tokenizer):
    config = tiny_config(chat_tokenizer, region_feature="roi_align")
    assert config.region_feature_size == config.vision_config.vision_width == 64
    with pytest.raises(ValueError, match="region_feature='roi'"):
        tiny_config(chat_tokenizer, region_feature="roi")


class _RoIAlignInputs(TorchDispatchMode):
    """Records the dtypes of the feature map and boxes every ``torchvision::roi_align`` call receives."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[tuple[torch.dtype, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "roi_align" in str(func):
            self.dtypes.append((args[0].dtype, args[1].dtype))
        return func(*args, **(kwargs or {}))


def test_bf16_model_matches_fp32_with_fp32_geometry(roi_model):
    """(b) The bf16 model's RoI features match the fp32 model's; the feature map and the boxes reach RoIAlign in
    fp32; with bf16 tokens RoIAlign gives exactly the fp32 result of the same values, and rounding the boxes to bf16
    (what fp32 geometry prevents) would change it."""
    model, processor = roi_model
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    inputs = _inputs(processor)
    boxes, index = inputs["region_boxes"], inputs["region_image_index"]
    assert boxes.dtype == torch.float32
    with torch.no_grad():
        reference = model.model.feature_layer_tokens(model.model.vision_tower.encode_images(inputs["pixel_values"]))
        state = bf16.model.vision_tower.encode_images(inputs["pixel_values"].to(torch.bfloat16))
        tokens = bf16.model.feature_layer_tokens(state)
        assert tokens.dtype == torch.bfloat16
        exact = roi_align_patch_features(tokens, boxes, index)
        assert exact.dtype == torch.float32
        assert torch.equal(exact, roi_align_patch_features(tokens.float(), boxes, index))
        rounded = roi_align_patch_features(tokens, boxes.to(torch.bfloat16), index)
        assert not torch.equal(rounded, exact), "the example must have boxes that bf16 rounds"
        cosine = F.cosine_similarity(exact, roi_align_patch_features(reference, boxes, index), dim=-1)
        assert cosine.min() > 0.999, cosine

        recorder = _RoIAlignInputs()
        with recorder:
            output = bf16(**{**inputs, "pixel_values": inputs["pixel_values"].to(torch.bfloat16)})
        fp32_output = model(**inputs)
    assert recorder.dtypes == [(torch.float32, torch.float32)]
    assert output.region_features.dtype == torch.bfloat16
    expected = bf16.model.region_projector(exact.to(torch.bfloat16))
    torch.testing.assert_close(output.region_features, expected, atol=0, rtol=0)
    cosine = F.cosine_similarity(output.region_features.float(), fp32_output.region_features, dim=-1)
    assert cosine.min() > 0.99, cosine


def test_forward_fills_regions_and_trains_the_region_projector(roi_model):
    """(c) ``<region>`` tokens get the projected RoI features; the loss reaches the region projector; the prompter
    is not used (no gradient)."""
    model, processor = roi_model
    model.train()
    inputs = _inputs(processor)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    output = model(**inputs, labels=labels)
    assert output.region_features.shape == (3, model.config.text_config.hidden_size)
    with torch.no_grad():
        state = model.model.vision_tower.encode_images(inputs["pixel_values"])
        tokens = state.hidden_states[model.config.vision_feature_layer][:, 1:]
        features = roi_align_patch_features(tokens, inputs["region_boxes"], inputs["region_image_index"])
        assert_close_across_instances(output.region_features, model.model.region_projector(features))
    assert not torch.allclose(output.region_features[0], output.region_features[1])
    output.loss.backward()
    for name in ("region_projector.linear_1", "region_projector.linear_2", "multi_modal_projector.linear_1"):
        assert model.model.get_submodule(name).weight.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.model.vision_tower.prompter.parameters())


def test_save_load_keeps_roi_align(tmp_path, roi_model):
    """(d) The option is saved with the model and the reloaded model gives the same outputs."""
    model, processor = roi_model
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert reloaded.config.region_feature == "roi_align"
    assert reloaded.model.region_projector.linear_1.in_features == model.config.vision_config.vision_width
    inputs = _inputs(processor)
    with torch.no_grad():
        assert_close_across_instances(reloaded(**inputs).region_features, model(**inputs).region_features)
