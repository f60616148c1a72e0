"""Smoke test of the region-embedding benchmark (``bench.region_embed``): it runs and prints; no timing checks."""

from __future__ import annotations

import json

import pytest
import torch

from bench.region_embed import format_table, main, random_boxes, run_benchmark


def test_benchmark_rows_and_table():
    rows = run_benchmark("tiny", box_counts=(1, 2), repeats=1, warmup=0)
    assert [row.boxes for row in rows] == [1, 2]
    for row in rows:
        assert min(row.vit_ms, row.prompts_ms, row.all_ms, row.crop_ms) > 0
        assert row.speedup_prompts > 0 and row.speedup_all > 0
        assert row.bound_all == row.layers * row.boxes / (row.layers + row.boxes)
    table = format_table(rows)
    assert "| boxes | ViT pass ms |" in table and "all-token mode at 2 boxes" in table


def test_random_boxes_are_valid_model_frame_boxes():
    boxes = random_boxes(50, torch.Generator().manual_seed(0), min_size=0.1)
    assert boxes.min() >= 0 and boxes.max() <= 1
    assert ((boxes[:, 2:] - boxes[:, :2]) >= 0.1 - 1e-6).all()


def test_quick_command_prints_the_table(capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["--quick", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "speed-up prompts" in capsys.readouterr().out


def test_generate_bench_smoke():
    """The generation bench runs, and the converted model generates transformers' tokens (checked inside)."""
    from bench.generate import run

    result = run(quick=True)
    assert result["ratio_ours_vs_transformers"] > 0 and result["batch8_vs_batch1_throughput"] > 0
    assert result["new_tokens"] == 8


def test_train_step_bench_smoke():
    """The training-step bench runs; both models start from equal losses (checked inside)."""
    from bench.train_step import run

    result = run(quick=True)
    assert result["ours_s"] > 0 and result["transformers_s"] > 0


def test_mllm_cloc_vs_clip_bench_smoke(tmp_path, capsys):
    """The fair-arms MLLM bench runs end to end on a tiny budget (one seed): two towers with encoder metrics, three
    arms (only the trained-prompter arm trains the tower, in both stages), results.json / results.md, the table."""
    from bench.mllm_cloc_vs_clip import main as mllm_bench

    assert mllm_bench(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert [row["arm"] for row in rows] == ["CLOC", "CLIP + trained prompter", "CLIP + RoI features"]
    assert [row["tower"] for row in rows] == ["CLOC", "CLIP-only", "CLIP-only"]
    assert all(0.0 <= row["grounding_acc@0.5"] <= 1.0 and row["referring_chance"] > 0 for row in rows)
    tuned = [row["arm"] for row in rows if row["trainable_stage1"]["vision"] and row["trainable_stage2"]["vision"]]
    assert tuned == ["CLIP + trained prompter"] and rows[1]["prompter_change"] > 0
    assert results["settings"]["recipe"]["grounding_steps"] == 2  # stage 2 in the recipe's two phases
    assert len(list(tmp_path.glob("seed0/arms/*/mllm/stage2_grounding/step-000002"))) == 3
    assert [row["tower"] for row in results["tower_rows"]] == ["CLOC", "CLIP-only"]
    assert all(0.0 <= row["region_cls_acc"] <= 1.0 for row in results["tower_rows"])
    assert results["summary"]["CLOC"]["grounding_acc@0.5"]["n"] == 1
    assert "| arm | seeds | grounding Acc@0.5" in (tmp_path / "results.md").read_text()
    assert "| CLIP + RoI features | 1 |" in capsys.readouterr().out


def test_mllm_cloc_vs_clip_bench_resumes(tmp_path, capsys):
    """``--resume`` keeps the rows of an earlier run with the same settings and trains only what they lack: one arm
    first, then the rest on the same towers (not pretrained again); other settings are refused."""
    from bench.mllm_cloc_vs_clip import main as mllm_bench

    assert mllm_bench(["--quick", "--arms", "CLOC", "--out", str(tmp_path)]) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    assert [row["arm"] for row in first["rows"]] == ["CLOC"]
    towers = sorted((tmp_path / "seed0" / "towers").glob("*/encoder/step-*/model.safetensors"))
    stamps = [path.stat().st_mtime_ns for path in towers]
    assert len(towers) == 2

    assert mllm_bench(["--quick", "--resume", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [row["arm"] for row in results["rows"]] == ["CLOC", "CLIP + trained prompter", "CLIP + RoI features"]
    assert results["rows"][0] == first["rows"][0]  # kept as it was
    assert results["tower_rows"] == first["tower_rows"]
    assert [path.stat().st_mtime_ns for path in towers] == stamps  # the towers were reused
    out = capsys.readouterr().out
    assert "CLOC, seed 0: done in an earlier run" in out and "reusing" in out

    with pytest.raises(SystemExit, match="other settings"):
        mllm_bench(["--quick", "--resume", "--out", str(tmp_path), "lr=1e-3"])


@pytest.mark.parametrize("vision", ["joint", "cloc"])
def test_grounding_calibration_bench_smoke(tmp_path, tiny_cloc, vision):
    """The calibration bench trains a few steps on fresh scenes (a jointly trained ViT, or a frozen CLOC tower with
    2 × 2 merged tokens and the world's own expressions) and appends its evaluations to eval.jsonl."""
    from bench.grounding_calibration import CalibrationConfig, run
    from cloc_encoder.image_processing import CLOCImageProcessor

    options = {}
    if vision == "cloc":
        tower = tmp_path / "tower"
        tiny_cloc.save_pretrained(tower)
        CLOCImageProcessor(image_size=tiny_cloc.config.vision_config.image_size).save_pretrained(tower)
        options = {"vision": str(tower), "merge": 2, "expressions": "world", "distinct_shapes": False}
    config = CalibrationConfig(
        steps=3, eval_at=[2], batch_size=4, eval_scenes=6, hidden_size=32, num_layers=1, **options
    )
    rows = run(config, tmp_path / "out", progress=False)
    assert [row["step"] for row in rows] == [2, 3]
    written = [json.loads(line) for line in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()]
    assert written == rows
    for row in rows:
        assert row["questions"] == 6 and 0 <= row["acc@0.5"] <= 1 and 0 <= row["selection"] <= 1
        assert 1 / 3 - 1e-9 <= row["selection_chance"] <= 1 / 2 + 1e-9
        assert 0.0 <= row["miou"] <= 1.0 and row["loss"] > 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vision"] == config.vision


def test_grounding_calibration_scores_answers_against_the_scene():
    """An answer's IoU is with the asked object and selection is the object it overlaps most; no box scores 0."""
    from bench.grounding_calibration import CalibrationConfig, SceneQuestions, score_answer
    from cloc_encoder.data.synthetic import SyntheticWorldConfig
    from mllm.box_codec import encode_box

    question = SceneQuestions(CalibrationConfig(), SyntheticWorldConfig(), seed=3).draw(1)[0]
    objects = question.scene.objects
    other = (question.target + 1) % len(objects)
    iou, selected = score_answer(f"It is at {encode_box(objects[question.target].box)}.", question)
    assert iou > 0.98 and selected  # the 0-999 grid moves each side by at most half a cell
    iou, selected = score_answer(encode_box(objects[other].box), question)
    assert iou < 0.9 and not selected  # the other object's box: it overlaps that one most
    assert score_answer("a red circle", question) == (0.0, False)
