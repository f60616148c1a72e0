"""``bench/grounding_diagnostics.py``: digit slots of a box answer, the patches a box touches, the answer statistics
(selection against the image's objects) and the model diagnostics' shape on a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch

from bench.grounding_diagnostics import _digit_slots, _patch_mask, answer_diagnostics, main
from cloc_encoder.data.format import read_region_text
from cloc_encoder.data.synthetic import SyntheticWorldConfig, generate_world
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
from mllm.tiny import tiny_config


def test_digit_slots_name_coordinate_and_digit():
    answer = " [7, 450, 12, 999]"
    tokens = [" [", "7", ",", " ", "4", "5", "0", ",", " ", "1", "2", ",", " 9", "9", "9", "]"]
    offsets, cursor = [], 0
    for token in tokens:
        offsets.append((cursor, cursor + len(token)))
        cursor += len(token)
    slots = _digit_slots(answer, offsets)
    assert [s for s in slots if s] == ["c0d0", "c1d0", "c1d1", "c1d2", "c2d0", "c2d1", "c3d0", "c3d1", "c3d2"]
    assert slots[0] is None and slots[2] is None and slots[-1] is None


def test_patch_mask_is_raster_order():
    mask = _patch_mask([0.0, 0.5, 0.26, 1.0], grid=4).reshape(4, 4)
    assert mask[2:, :2].all() and not mask[:2].any() and not mask[:, 2:].any()
    assert _patch_mask([0.3, 0.3, 0.3, 0.3], grid=4).sum() == 1  # a point touches one patch


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(SyntheticWorldConfig(image_size=32), out, {"test": 4})
    return out


def test_answer_diagnostics_count_selection_and_question_sensitivity(world, tmp_path):
    records = read_region_text(world / "test.jsonl")
    lines = []
    for record in records:
        first = record.regions[0].box
        for region in record.regions:  # every question answered with the first object's box
            answer = "[" + ", ".join(str(round(v * 999)) for v in first) + "]"
            lines.append({"image": str(record.image_path), "answer": answer, "target_box": list(region.box)})
    path = tmp_path / "predictions_grounding.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = answer_diagnostics(records, path, "int999")
    questions = sum(len(r.regions) for r in records)
    assert report["questions_on_multi_object_images"] == questions  # 2-3 objects on every image
    assert report["selection_rate"] == pytest.approx(len(records) / questions)
    assert report["selection_chance"] == pytest.approx(len(records) / questions)  # 1/objects summed per image
    assert report["answers_differ"] == 0 and report["images_with_several_questions"] == len(records)
    assert report["iou_when_selected"] == pytest.approx(1.0, abs=0.01) and report["acc@0.5_when_selected"] == 1.0


def test_command_line_on_a_tiny_model(world, chat_tokenizer, tmp_path, capsys):
    torch.manual_seed(0)
    config = tiny_config(chat_tokenizer)
    model = CLOCLlavaForConditionalGeneration._from_config(config).eval()
    model.save_pretrained(tmp_path / "model")
    CLOCLlavaProcessor.from_model_config(config, chat_tokenizer).save_pretrained(tmp_path / "model")
    out = tmp_path / "report.json"
    args = ["--model", str(tmp_path / "model"), "--data", str(world / "test.jsonl"), "--images", "2", "--out", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["questions"] > 0 and set(report["digit_accuracy"]) >= {"c0d0", "c3d0"}
    assert len(report["attention"]) == config.text_config.num_hidden_layers
    for layer in report["attention"]:
        assert 0.0 <= layer["on_image"] <= 1.0 + 1e-9 and 0.0 <= layer["on_object"] <= 1.0 + 1e-9
    assert 0.0 < report["object_area"] <= 1.0
