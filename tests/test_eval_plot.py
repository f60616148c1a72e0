"""``python -m eval plot``: qualitative grounding examples drawn from hand-written prediction files and tiny PNGs,
and the ``image``/``target_box`` fields the benchmarks now record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cloc_encoder.data.format import read_region_text
from cloc_encoder.data.synthetic import SyntheticWorldConfig, generate_world
from eval.cli import main as eval_main
from eval.flickr30k.task import region_phrase_questions
from eval.mllm_generation import Question, prediction_record
from eval.plot_predictions import load_examples, plot_predictions, select_examples
from eval.refcoco.data import read_regiontext
from eval.refcoco.evaluate import rec_questions
from eval.regions.evaluate import evaluate_regions
from eval.regions.tasks import grounding_questions, referring_questions
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
from mllm.box_codec import get_box_codec
from mllm.tiny import tiny_config

INT999 = get_box_codec("int999")
TILE = 128  # a 64x48 image is drawn at 128x96: twice its size
TARGET = (0.1, 0.1, 0.4, 0.4)
WRONG = (0.6, 0.6, 0.9, 0.9)


def _png(path: Path, size: tuple[int, int] = (64, 48)) -> str:
    Image.new("RGB", size, (255, 255, 255)).save(path)
    return str(path)


def _record(id: str, image: str, answer: str | None, target: tuple[float, ...] | None = TARGET) -> dict:
    record = {"id": id, "question": f"Where is the thing {id}?", "answer": answer, "image": image}
    if target is not None:
        record["target_box"] = list(target)
    return record


@pytest.fixture()
def eval_folder(tmp_path: Path) -> Path:
    """An eval output folder: eval_run.json (int999) and predictions with a hit, a miss, no box, an old record
    (no image/target_box) and a missing image."""
    out = tmp_path / "eval"
    out.mkdir()
    image = _png(tmp_path / "white.png")
    (out / "eval_run.json").write_text(json.dumps({"box_codec": "int999"}))
    records = [
        _record("hit", image, f"It is at {INT999.encode((0.1, 0.12, 0.4, 0.4))}."),
        _record("miss", image, INT999.encode(WRONG)),
        _record("nobox", image, "I cannot tell."),
        {"id": "old", "question": "Where is the old one?", "answer": INT999.encode(TARGET)},
        _record("gone", str(tmp_path / "missing.png"), INT999.encode(TARGET)),
    ]
    (out / "predictions_grounding.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def _colour(image: Image.Image, x: float, y: float) -> tuple[int, int, int]:
    return image.getpixel((int(x), int(y)))  # type: ignore[return-value]


def _is_green(rgb: tuple[int, int, int]) -> bool:
    return rgb[1] > 150 and rgb[0] < 80 and rgb[2] < 80


def _is_red(rgb: tuple[int, int, int]) -> bool:
    return rgb[0] > 150 and rgb[1] < 80 and rgb[2] < 80


def test_plot_command_writes_tiles_sheet_and_index(eval_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plots = eval_folder / "plots"
    args = ["plot", "--predictions", str(eval_folder / "predictions_grounding.jsonl"), "--out", str(plots)]
    assert eval_main([*args, "--tile", str(TILE)]) == 0
    captured = capsys.readouterr()
    assert "wrote 3 examples" in captured.out and "box codec int999" in captured.out
    assert "1 of 5 records have no image/target_box" in captured.err and "1 images not found" in captured.err

    index = [json.loads(line) for line in (plots / "examples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in index] == ["hit", "miss", "nobox"]  # file order
    assert [r["hit"] for r in index] == [True, False, False] and index[1]["iou"] == 0.0
    assert index[0]["iou"] == pytest.approx(0.3 * 0.28 / 0.09, abs=0.01)
    for row in index:
        tile = Image.open(plots / row["file"])
        assert tile.width == TILE and tile.height > 96  # the image, then the caption strip
    sheet = Image.open(plots / "contact_sheet.png")
    assert sheet.width > 2 * TILE and sheet.height > 2 * 96  # 2x2 grid under a title

    miss = Image.open(plots / index[1]["file"]).convert("RGB")
    width, height = 128, 96
    # Left edges of the boxes, half-way down: green for the ground truth, red for the prediction.
    assert _is_green(_colour(miss, TARGET[0] * width + 1, (TARGET[1] + TARGET[3]) / 2 * height))
    assert _is_red(_colour(miss, WRONG[0] * width + 1, (WRONG[1] + WRONG[3]) / 2 * height))
    # Inside either box, and between them, the white image shows.
    assert _colour(miss, 0.25 * width, 0.25 * height) == (255, 255, 255)
    assert _colour(miss, 0.75 * width, 0.75 * height) == (255, 255, 255)
    assert _colour(miss, 0.5 * width, 0.5 * height) == (255, 255, 255)
    # No answer box: only the ground truth is drawn.
    nobox = Image.open(plots / index[2]["file"]).convert("RGB")
    assert _is_green(_colour(nobox, TARGET[0] * width + 1, 0.25 * height))
    assert _colour(nobox, WRONG[0] * width + 1, 0.75 * height) == (255, 255, 255)

    # A second plot into the same folder replaces the first one's example files.
    assert eval_main([*args, "--num", "1", "--tile", "64"]) == 0
    assert len(list(plots.glob("0*.png"))) == 1 and len((plots / "examples.jsonl").read_text().splitlines()) == 1


def test_only_misses_seed_and_num(eval_folder: Path) -> None:
    examples, without = load_examples(eval_folder / "predictions_grounding.jsonl", INT999)
    assert [e.id for e in examples] == ["hit", "miss", "nobox", "gone"] and without == 1
    assert [e.id for e in select_examples(examples, 10, only_misses=True)] == ["miss", "nobox"]
    picks = {tuple(e.id for e in select_examples(examples, 2, seed=s)) for s in range(20)}
    assert len(picks) > 1 and all(len(p) == 2 for p in picks)
    assert select_examples(examples, 2, seed=3) == select_examples(examples, 2, seed=3)

    report = plot_predictions(
        eval_folder / "predictions_grounding.jsonl", eval_folder / "misses", num=1, only_misses=True, tile=64
    )
    assert len(report.files) == 1 and report.misses == 2 and report.drawable == 3
    assert {p.name for p in (eval_folder / "misses").iterdir()} == {
        "contact_sheet.png",
        "examples.jsonl",
        *report.files,
    }


def test_codec_override_images_folder_and_exit_statuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    images.mkdir()
    _png(images / "a.png")
    predictions = tmp_path / "predictions_rec.jsonl"  # no eval_run.json; image moved since the run
    record = _record("a", "/elsewhere/a.png", "[100, 100, 400, 400]")
    predictions.write_text(json.dumps(record) + "\n")
    base = ["plot", "--predictions", str(predictions), "--out", str(tmp_path / "p")]
    assert eval_main(base) == 1  # image not found
    assert "nothing could be plotted" in capsys.readouterr().err
    assert eval_main([*base, "--images", str(images), "--box-codec", "float", "--only-misses"]) == 0
    assert "wrote 1 examples" in capsys.readouterr().out  # the float codec reads the integers 100.. as 1: a miss
    assert eval_main([*base, "--images", str(images), "--only-misses"]) == 0  # int999: 100 / 999 = 0.1001, a hit
    assert "no miss to plot" in capsys.readouterr().out
    report = plot_predictions(predictions, tmp_path / "q", box_codec="int999", images_dir=images)
    assert report.box_codec == "int999" and len(report.files) == 1
    assert json.loads((tmp_path / "q" / "examples.jsonl").read_text())["iou"] == pytest.approx(1.0, abs=0.01)

    assert eval_main(["plot", "--predictions", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert eval_main([*base, "--num", "0"]) == 2
    assert eval_main([*base, "--box-codec", "nonsense"]) == 2
    old = tmp_path / "old.jsonl"  # written before image/target_box were recorded: still read, nothing to draw
    old.write_text(json.dumps({"id": "1", "question": "q", "answer": "[1, 2, 3, 4]"}) + "\n")
    assert eval_main(["plot", "--predictions", str(old), "--out", str(tmp_path / "y")]) == 1


def test_benchmarks_record_image_and_target_box(tmp_path: Path) -> None:
    world = tmp_path / "world"
    generate_world(SyntheticWorldConfig(image_size=32), world, {"test": 2})
    records = read_region_text(world / "test.jsonl")
    questions, targets = grounding_questions(records)
    assert all(q.target_box == targets[q.id].box for q in questions)
    samples, _ = read_regiontext(world / "test.jsonl")
    rec, rec_targets = rec_questions(samples)
    assert rec and all(q.target_box == rec_targets[q.id].box for q in rec)
    phrases = region_phrase_questions(records)
    assert all(q.target_box == phrases.targets[q.id].boxes[0] for q in phrases.questions)
    referring, _ = referring_questions(records, INT999)
    assert all(q.target_box is None for q in referring)  # not a grounding answer: nothing to plot against

    record = prediction_record(Question("x", Path("img.png"), "Where?", target_box=(0.0, 0.25, 0.5, 1.0)), "a")
    assert record == {
        "id": "x",
        "answer": "a",
        "question": "Where?",
        "image": "img.png",
        "target_box": [0.0, 0.25, 0.5, 1.0],
    }
    assert "target_box" not in prediction_record(Question("y", Path("img.png"), "What?"), None)


def test_regions_output_folder_plots_end_to_end(chat_tokenizer, tmp_path: Path) -> None:
    world = tmp_path / "world"
    generate_world(SyntheticWorldConfig(image_size=32), world, {"test": 2})
    torch.manual_seed(0)
    config = tiny_config(chat_tokenizer, text_config={"initializer_range": 0.2})
    model = CLOCLlavaForConditionalGeneration._from_config(config).eval()
    processor = CLOCLlavaProcessor.from_model_config(config, chat_tokenizer)
    records = read_region_text(world / "test.jsonl")
    out = tmp_path / "eval"
    evaluate_regions(model, processor, records, out, tasks=("grounding",), progress=False)
    line = json.loads((out / "predictions_grounding.jsonl").read_text().splitlines()[0])
    assert Path(line["image"]).is_file() and len(line["target_box"]) == 4
    args = ["plot", "--predictions", str(out / "predictions_grounding.jsonl"), "--out", str(out / "plots")]
    assert eval_main([*args, "--num", "3", "--tile", "64"]) == 0
    assert len(list((out / "plots").glob("0*.png"))) == 3 and (out / "plots" / "contact_sheet.png").is_file()
