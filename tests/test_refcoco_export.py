"""Region-text records → lmms-lab RefCOCO parquet (for lmms-eval's REC task), read back by the project's reader."""

from __future__ import annotations

import pytest

from cloc_encoder.data.format import read_region_text
from eval.refcoco.data import read_parquet
from eval.refcoco.export import main, write_refcoco_parquet


def test_export_round_trips_through_the_parquet_reader(world, tmp_path):
    records = read_region_text(world / "val.jsonl")[:8]
    rows = write_refcoco_parquet(records, tmp_path / "lmms" / "val-00000.parquet")
    expected = {
        f"{record.id}-{index}": (region.box, tuple(region.expressions))
        for record in records
        for index, region in enumerate(record.regions)
        if region.expressions
    }
    assert rows == len(expected) > 0
    samples, report = read_parquet(tmp_path / "lmms", "val", tmp_path / "cache")
    assert not report.skipped and len(samples) == rows
    for sample in samples:
        box, expressions = expected[sample.id]
        assert sample.box == pytest.approx(box, abs=1e-6)  # pixels xywh (float32) and back to normalised xyxy
        assert sample.expressions == expressions


def test_export_command_line(world, tmp_path, capsys):
    out = tmp_path / "val-00000.parquet"
    tasks = tmp_path / "tasks"
    assert main(["--data", str(world / "val.jsonl"), "--out", str(out), "--limit", "3", "--task-dir", str(tasks)]) == 0
    assert out.is_file() and "rows to" in capsys.readouterr().out
    task = (tasks / "refcoco_bbox_rec_local.yaml").read_text()
    assert "test_split: val" in task and str(out.resolve()) in task  # the split comes from the file's name
    assert main(["--data", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
