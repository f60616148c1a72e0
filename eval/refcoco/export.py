"""Region-text records → parquet in the ``lmms-lab/RefCOCO`` layout, so that lmms-eval's own REC task
(``refcoco_bbox_rec``, through :func:`eval.lmms_eval_plugin.write_rec_task`) can score a model on any region-text
split, e.g. the synthetic world's held-out test images.

One row per region with at least one expression: ``question_id`` (``<record id>-<region index>``), ``image``
(``{"bytes": PNG/JPEG bytes, "path": None}``), ``question`` (lmms-lab's fixed text), ``answer`` (the region's
expressions), ``segmentation`` (the box as a polygon), ``bbox`` (``[x, y, w, h]`` in pixels of the original image,
as COCO writes it), ``iscrowd`` (0) and ``file_name``. :func:`eval.refcoco.data.read_parquet` reads it back.

    python -m eval.refcoco.export --data runs/world/test.jsonl --out runs/world/lmms/val-00000.parquet \
        [--limit N] [--task-dir runs/world/lmms/tasks]      # --task-dir: also lmms-eval's task YAML
    python -m lmms_eval --model cloc_llava --model_args pretrained=runs/mllm_tiny_stage2 \
        --include_path runs/world/lmms/tasks --tasks refcoco_bbox_rec_local --batch_size 16 --device cpu \
        --output_path runs/lmms_out
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cloc_encoder.data.format import RegionTextRecord, read_region_text

LMMS_QUESTION = "Please carefully observe the area circled in the image and come up with a caption for the area."
"""The ``question`` column of lmms-lab/RefCOCO (the REC task does not read it)."""


def refcoco_rows(records: Sequence[RegionTextRecord]) -> dict[str, list[Any]]:
    """Columns of the lmms-lab RefCOCO schema for ``records`` (boxes: normalised ``xyxy`` → pixel ``xywh``)."""
    columns: dict[str, list[Any]] = {
        key: [] for key in ("question_id", "image", "question", "answer", "segmentation", "bbox", "iscrowd")
    }
    columns["file_name"] = []
    for record in records:
        expressions = [[e.strip() for e in region.expressions if e.strip()] for region in record.regions]
        if not any(expressions):
            continue
        raw = record.image_path.read_bytes()
        for index, (region, answers) in enumerate(zip(record.regions, expressions, strict=True)):
            if not answers:
                continue
            x1, y1, x2, y2 = region.box
            x, y = x1 * record.width, y1 * record.height
            w, h = (x2 - x1) * record.width, (y2 - y1) * record.height
            columns["question_id"].append(f"{record.id}-{index}")
            columns["image"].append({"bytes": raw, "path": None})
            columns["question"].append(LMMS_QUESTION)
            columns["answer"].append(answers)
            columns["segmentation"].append([x, y, x + w, y, x + w, y + h, x, y + h])
            columns["bbox"].append([x, y, w, h])
            columns["iscrowd"].append(0)
            columns["file_name"].append(record.image_path.name)
    return columns


def write_refcoco_parquet(records: Sequence[RegionTextRecord], out: str | Path) -> int:
    """Write ``records`` as one lmms-lab RefCOCO parquet file; returns the number of rows."""
    import datasets  # lmms-eval's dependency; imported here so that the rest of eval/ does not need it

    columns = refcoco_rows(records)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp")
    datasets.Dataset.from_dict(columns, features=refcoco_features()).to_parquet(str(temporary))
    temporary.replace(out)
    return len(columns["question_id"])


def refcoco_features() -> Any:
    """The ``datasets.Features`` of the lmms-lab RefCOCO schema."""
    import datasets

    return datasets.Features(
        question_id=datasets.Value("string"),
        image=datasets.Image(),
        question=datasets.Value("string"),
        answer=datasets.Sequence(datasets.Value("string")),
        segmentation=datasets.Sequence(datasets.Value("float32")),
        bbox=datasets.Sequence(datasets.Value("float32")),
        iscrowd=datasets.Value("int64"),
        file_name=datasets.Value("string"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.refcoco.export", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="region-text JSONL file or folder of shards")
    parser.add_argument("--out", required=True, type=Path, help="output .parquet (lmms-lab layout: <split>-*.parquet)")
    parser.add_argument("--limit", type=int, help="only the first N records")
    parser.add_argument("--task-dir", type=Path, help="also write lmms-eval's REC task YAML on the file here")
    parser.add_argument("--task", default="refcoco_bbox_rec_local", help="the task's name (with --task-dir)")
    args = parser.parse_args(argv)
    try:
        records = read_region_text(args.data)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = write_refcoco_parquet(records[: args.limit] if args.limit else records, args.out)
    print(f"wrote {rows} rows to {args.out}")
    if args.task_dir is not None and rows:
        from eval.lmms_eval_plugin import write_rec_task

        split = args.out.name.split("-", 1)[0]  # lmms-lab's file names: <split>-NNNNN.parquet
        print(f"wrote {write_rec_task(args.task_dir, args.out, task=args.task, split=split)}")
    return 0 if rows else 1


__all__ = ["LMMS_QUESTION", "main", "refcoco_features", "refcoco_rows", "write_refcoco_parquet"]


if __name__ == "__main__":
    sys.exit(main())
