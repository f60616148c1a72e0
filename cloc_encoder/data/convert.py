"""Command line for the data-set converters (see ``docs/converters.md``)::

    python -m cloc_encoder.data.convert coco --instances instances_train2017.json \\
        [--captions captions_train2017.json] --images-dir coco/train2017 --out data/coco_train.jsonl
    python -m cloc_encoder.data.convert lvis --annotations lvis_v1_val.json --images-dir coco --out data/lvis_val.jsonl
    python -m cloc_encoder.data.convert vg --region-descriptions region_descriptions.json \\
        --image-data image_data.json --images-dir vg/images --out data/vg.jsonl
    python -m cloc_encoder.data.convert refcoco --root refer/data --dataset refcoco --split-by unc --split val \\
        --images-dir coco/train2014 --out data/refcoco_unc_val.jsonl

Boxes are written as ``xyxy`` normalised by the original image size. Image paths are written relative to the
output file's folder by default (the format resolves them from there). Prints the skip report; exit status 0 on
success, 1 when nothing was converted (no file is written), 2 on a missing file or wrong schema.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cloc_encoder.data.converters import (
    PIXEL_TOLERANCE,
    ConversionError,
    convert_coco,
    convert_lvis,
    convert_refcoco,
    convert_visual_genome,
    write_records,
)
from cloc_encoder.data.converters.refcoco import SPLIT_BYS


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output JSONL file")
    parser.add_argument("--images-dir", default="images", help="folder holding the images (default: images)")
    parser.add_argument(
        "--image-paths",
        choices=("relative", "absolute", "as-given"),
        default="relative",
        help="write image paths relative to the output's folder (default), absolute, or as <images-dir>/<file>",
    )
    parser.add_argument("--check-images", action="store_true", help="skip images whose file does not exist")
    parser.add_argument("--tolerance", type=float, default=PIXEL_TOLERANCE, help="pixels of box overflow clipped")
    parser.add_argument("--max-examples", type=int, default=20, help="example skip messages kept in the report")
    parser.add_argument("--report-json", type=Path, help="also write the report as JSON here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cloc_encoder.data.convert", description=__doc__.split("::")[0])
    sub = parser.add_subparsers(dest="source", required=True)
    coco = sub.add_parser("coco", help="COCO instances_*.json (+ captions_*.json)")
    coco.add_argument("--instances", required=True, type=Path, help="instances_<split>.json")
    coco.add_argument("--captions", type=Path, help="captions_<split>.json (image captions)")
    coco.add_argument("--include-crowd", action="store_true", help="keep iscrowd boxes")
    coco.add_argument("--keep-empty", action="store_true", help="keep images without any usable box")
    coco.add_argument("--caption-index", type=int, default=0, help="which caption of each image (wraps around)")
    coco.add_argument("--per-caption", action="store_true", help="one record per caption instead of one per image")
    _add_common(coco)
    lvis = sub.add_parser("lvis", help="LVIS lvis_v1_*.json (images under the COCO root: train2017/, val2017/)")
    lvis.add_argument("--annotations", required=True, type=Path, help="lvis_v1_<split>.json")
    lvis.add_argument("--keep-empty", action="store_true", help="keep images without any usable box")
    _add_common(lvis)
    vg = sub.add_parser("vg", help="Visual Genome region_descriptions.json + image_data.json")
    vg.add_argument("--region-descriptions", required=True, type=Path, help="region_descriptions.json")
    vg.add_argument("--image-data", required=True, type=Path, help="image_data.json")
    vg.add_argument("--layout", choices=("flat", "url"), default="flat", help="<id>.jpg or <VG_100K*>/<id>.jpg")
    vg.add_argument("--keep-duplicates", action="store_true", help="keep repeated (phrase, box) regions")
    vg.add_argument("--keep-empty", action="store_true", help="keep images without any usable region")
    _add_common(vg)
    ref = sub.add_parser("refcoco", help="RefCOCO/RefCOCO+/RefCOCOg in the refer toolkit layout")
    ref.add_argument("--root", required=True, type=Path, help="folder holding refcoco/, refcoco+/, refcocog/")
    ref.add_argument("--dataset", choices=sorted(SPLIT_BYS), default="refcoco")
    ref.add_argument(
        "--split-by", default="unc", help="unc / google (refcoco), unc (refcoco+), umd / google (refcocog)"
    )
    ref.add_argument("--split", default="val", help="train, val, testA, testB (unc) or test (umd, google)")
    _add_common(ref)
    return parser


def _locator_args(args: argparse.Namespace) -> dict[str, Any]:
    images_dir: str = args.images_dir
    if args.image_paths == "absolute":
        return {"images_dir": os.path.abspath(images_dir), "relative_to": None}
    if args.image_paths == "as-given":
        return {"images_dir": images_dir, "relative_to": None}
    return {"images_dir": images_dir, "relative_to": args.out.parent}


def run(args: argparse.Namespace) -> int:
    common = {
        **_locator_args(args),
        "check_images": args.check_images,
        "tolerance": args.tolerance,
        "max_examples": args.max_examples,
    }
    if args.source == "coco":
        records, report = convert_coco(
            args.instances,
            captions_json=args.captions,
            include_crowd=args.include_crowd,
            keep_empty=args.keep_empty,
            caption_index=args.caption_index,
            one_record_per_caption=args.per_caption,
            **common,
        )
    elif args.source == "lvis":
        records, report = convert_lvis(args.annotations, keep_empty=args.keep_empty, **common)
    elif args.source == "vg":
        records, report = convert_visual_genome(
            args.region_descriptions,
            args.image_data,
            layout=args.layout,
            dedupe=not args.keep_duplicates,
            keep_empty=args.keep_empty,
            **common,
        )
    else:
        records, report = convert_refcoco(
            args.root, dataset=args.dataset, split_by=args.split_by, split=args.split, **common
        )
    print(report.summary())
    if args.report_json is not None:
        args.report_json.parent.mkdir(parents=True, exist_ok=True)
        args.report_json.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    if not records:
        print(f"error: nothing converted; {args.out} not written", file=sys.stderr)
        return 1
    count = write_records(records, args.out)
    print(f"wrote {count} records to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ConversionError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
