"""CLOC-LLaVA processor: <image> expansion, region boxes in two frames, chat template, box post-processing."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

import mllm  # noqa: F401 - registers the Auto classes
from cloc_encoder.image_processing import CLOCImageProcessor, RegionOutsideInputError
from mllm import CLOCLlavaProcessor
from mllm.chat_template import VICUNA_SYSTEM_PROMPT, VICUNA_V1_CHAT_TEMPLATE
from mllm.tiny import tiny_config


@pytest.fixture()
def processor(chat_tokenizer):
    return CLOCLlavaProcessor.from_model_config(tiny_config(chat_tokenizer), copy.deepcopy(chat_tokenizer))


def test_image_tokens_are_expanded_per_image(processor):
    images = [Image.new("RGB", (40, 30)), Image.new("RGB", (30, 40)), Image.new("RGB", (32, 32))]
    inputs = processor(
        images=[images[:2], images[2:]], text=["<image><image>\nTwo images.", "One <image> here."], padding=True
    )
    counts = (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    assert counts == [2 * 16, 16]
    assert inputs["pixel_values"].shape == (3, 3, 32, 32)
    assert "region_boxes" not in inputs
    with pytest.raises(ValueError, match="the texts have 1 <image> tokens but 2 images"):
        processor(images=images[:2], text=["Only <image>."])


def test_boxes_go_to_the_model_frame_and_text_stays_in_the_original_frame(processor):
    image = Image.new("RGB", (80, 40))  # padded at top and bottom: y changes between frames, x does not
    transform = CLOCImageProcessor(image_size=32).frame_transform(80, 40)
    box = [0.1, 0.2, 0.6, 0.8]
    text = f"<image>\nWhat is {processor.format_region(box)}?"
    assert "[100, 200, 599, 799] <region>" in text  # original frame, 0–999 grid
    from_text = processor(images=[image], text=[text])
    expected = transform.boxes_to_model(torch.tensor([[100 / 999, 200 / 999, 599 / 999, 799 / 999]]))
    torch.testing.assert_close(from_text["region_boxes"], expected)
    assert from_text["region_boxes"][0, 1] == pytest.approx((0.2 * 16 + 8) / 32, abs=2e-3)  # y: padded frame
    assert from_text["region_boxes"][0, 0] == pytest.approx(0.1, abs=1e-3)  # x: unchanged
    assert from_text["region_image_index"].tolist() == [0]
    decoded = processor.batch_decode(from_text["input_ids"], skip_special_tokens=False)[0]
    assert "[100, 200, 599, 799] <region>" in decoded  # the tokens still carry the original-frame text

    # Given boxes win over the text (exact floats instead of the 0–999 grid); bare <region> works with boxes.
    given = processor(
        images=[image, image],
        text=[text, "<image>\n<region> and <region>?"],
        boxes=[[box], [[0.0, 0.0, 0.5, 0.5], box]],
        padding=True,
    )
    torch.testing.assert_close(
        given["region_boxes"], transform.boxes_to_model(torch.tensor([box, [0, 0, 0.5, 0.5], box]))
    )
    assert given["region_image_index"].tolist() == [0, 1, 1]


def test_casting_inputs_to_bf16_keeps_boxes_in_fp32(processor):
    """``inputs.to(device, torch.bfloat16)`` (the usual transformers idiom) casts pixels, never coordinates."""
    box = [0.1254, 0.3001, 0.1262, 0.9003]  # a thin box that bf16 would round across a patch centre
    inputs = processor(images=[Image.new("RGB", (64, 64))], text=["<image>\n<region>?"], boxes=[[box]])
    boxes = inputs["region_boxes"].clone()
    cast = inputs.to("cpu", torch.bfloat16)
    assert cast["pixel_values"].dtype == torch.bfloat16
    assert cast["region_boxes"].dtype == torch.float32 and torch.equal(cast["region_boxes"], boxes)
    assert cast["input_ids"].dtype == torch.long


def test_region_errors_are_actionable(processor):
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match=r"text 0: <region> #0 is not preceded by a box like '\[100, 200, 300, 400\]'"):
        processor(images=[image], text=["<image>\nWhat is <region>?"])
    with pytest.raises(ValueError, match="text 0 has 1 <region> tokens but 2 boxes"):
        processor(images=[image], text=["<image>\n<region>"], boxes=[[[0, 0, 1, 1], [0, 0, 1, 1]]])
    with pytest.raises(ValueError, match=r"boxes\[0\]\[0\].*inverted"):
        processor(images=[image], text=["<image>\n<region>"], boxes=[[[0.5, 0, 0.1, 1]]])
    with pytest.raises(ValueError, match="regions need exactly one image"):
        processor(images=[image, image], text=["<image><image> [1, 2, 300, 400] <region>"])
    with pytest.raises(ValueError, match="was it truncated"):
        processor(images=[image], text=["<image>\nHi"], truncation=True, max_length=8)


def test_tokenizer_without_placeholders_is_refused(caption_tokenizer):
    with pytest.raises(ValueError, match="add_mllm_tokens"):
        CLOCLlavaProcessor(CLOCImageProcessor(image_size=32), copy.deepcopy(caption_tokenizer), image_seq_length=16)


def test_vicuna_template_is_shared_by_training_and_inference(processor):
    assert processor.chat_template is processor.tokenizer.chat_template
    assert processor.chat_template == VICUNA_V1_CHAT_TEMPLATE
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is [1, 2, 3, 4] <region>?"}]},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "Where is it?"},
        {"role": "assistant", "content": "[10, 20, 300, 400]"},
    ]
    training = processor.apply_chat_template(conversation)
    assert training == (
        f"{VICUNA_SYSTEM_PROMPT} USER: <image>\nWhat is [1, 2, 3, 4] <region>? ASSISTANT: A red circle.</s>"
        "USER: Where is it? ASSISTANT: [10, 20, 300, 400]</s>"
    )
    assert processor.tokenizer.apply_chat_template(conversation, tokenize=False) == training
    inference = processor.apply_chat_template(conversation[:3], add_generation_prompt=True)
    assert inference == training[: training.rindex(" [10, 20")]
    # Token level: the inference prompt is a prefix of the training sequence.
    image = Image.new("RGB", (32, 32))
    train_ids = processor(images=[image], text=[training])["input_ids"][0]
    prompt_ids = processor(images=[image], text=[inference])["input_ids"][0]
    assert torch.equal(train_ids[: len(prompt_ids)], prompt_ids)
    # The replies and their </s> are the assistant tokens (what carries the loss in training).
    rendered = processor.tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    marked = [t for t, m in zip(rendered["input_ids"], rendered["assistant_masks"], strict=True) if m]
    assert processor.tokenizer.decode(marked) == " A red circle.</s> [10, 20, 300, 400]</s>"
    # Tokenizing through the template (images inside the messages) gives the same model inputs.
    with_image = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi?"}]}]
    direct = processor.apply_chat_template(with_image, tokenize=True, return_dict=True, add_generation_prompt=True)
    reference = processor(images=[image], text=[processor.apply_chat_template(with_image, add_generation_prompt=True)])
    assert all(torch.equal(direct[key], reference[key]) for key in reference)
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(system, add_generation_prompt=True) == "Be brief. USER: Hi ASSISTANT:"


def test_template_defaults(chat_tokenizer):
    plain = copy.deepcopy(chat_tokenizer)
    plain.chat_template = None
    assert CLOCLlavaProcessor(CLOCImageProcessor(image_size=32), plain, image_seq_length=16).chat_template == (
        VICUNA_V1_CHAT_TEMPLATE
    )
    custom = copy.deepcopy(chat_tokenizer)
    custom.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    kept = CLOCLlavaProcessor(CLOCImageProcessor(image_size=32), custom, image_seq_length=16)
    assert kept.chat_template == custom.chat_template


def test_post_process_boxes(processor):
    answer = "It is at [100, 200, 599, 799], next to [0, 0, 999, 999]."
    boxes = processor.post_process_boxes(answer)
    assert boxes[0] == pytest.approx((100 / 999, 200 / 999, 599 / 999, 799 / 999))
    assert processor.post_process_boxes([answer, "no box"], image_size=[(999, 999), (10, 10)]) == [
        [pytest.approx((100, 200, 599, 799)), pytest.approx((0, 0, 999, 999))],
        [],
    ]
    assert processor.post_process_boxes("[1, 2, 3]") == []


def test_save_load_with_auto_processor(tmp_path, chat_tokenizer):
    config = tiny_config(chat_tokenizer, box_codec="float")
    processor = CLOCLlavaProcessor.from_model_config(config, copy.deepcopy(chat_tokenizer))
    processor.save_pretrained(tmp_path)
    config.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is CLOCLlavaProcessor
    assert loaded.format_region([0.1, 0.2, 0.3, 0.4]) == "[0.100, 0.200, 0.300, 0.400] <region>"
    assert loaded.chat_template == processor.chat_template == loaded.tokenizer.chat_template
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    # Overrides of the image processor reach it (CLOCImageProcessor declares its valid kwargs).
    assert CLOCLlavaProcessor.from_pretrained(tmp_path, image_size=64).image_processor.image_size == 64


def test_a_region_outside_the_centre_crop_is_an_error(chat_tokenizer):
    """With ``resize_mode="crop"`` (converted llava-hf models) a region the crop cuts away is refused by name."""
    processor = CLOCLlavaProcessor.from_model_config(
        tiny_config(chat_tokenizer), copy.deepcopy(chat_tokenizer), image_processor_kwargs={"resize_mode": "crop"}
    )
    image = Image.new("RGB", (200, 50))  # the crop keeps x in [0.375, 0.625]
    inputs = processor(images=[image], text=["<image>\n<region>?"], boxes=[[[0.3, 0.2, 0.5, 0.8]]])
    assert inputs["region_boxes"][0, 0] == 0.0 and inputs["region_boxes"][0, 2] > 0.0  # partly visible: clipped
    with pytest.raises(RegionOutsideInputError, match=r"region 0: box \[0.0, 0.0, 0.1, 1.0\] lies outside"):
        processor(images=[image], text=["<image>\n<region>?"], boxes=[[[0.0, 0.0, 0.1, 1.0]]])
