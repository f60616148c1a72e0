"""``python -m eval encoder-zeroshot {coco,lvis,folder}``: zero-shot scores of a CLOC encoder alone.

    python -m eval encoder-zeroshot coco --model DIR --instances instances_val2017.json --images val2017 --out DIR
    python -m eval encoder-zeroshot lvis --model DIR --instances lvis_v1_val.json --images COCO_ROOT --out DIR
    python -m eval encoder-zeroshot folder --model DIR --folder imagenet/val --classnames names.txt --out DIR

Exit status: 0 on success, 1 when no image could be read (``metrics.json`` is still written), 2 when the model,
tokenizer or data cannot be loaded or an argument is invalid.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from cloc_encoder import CLOCModel
from cloc_encoder.data.converters.common import ConversionError
from cloc_encoder.image_processing import CLOCImageProcessor
from cloc_encoder.run_folder import resolve_model_folder
from eval.zeroshot.evaluate import (
    ENSEMBLE_TEMPLATES,
    IMAGE_TEMPLATES,
    REGION_TEMPLATES,
    check_templates,
    evaluate_image_zeroshot,
    evaluate_region_zeroshot,
    load_image_folder,
    load_instance_set,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TITLES = {"coco": "COCO region classification", "lvis": "LVIS region classification", "folder": "Image classification"}


def _common(parser: argparse.ArgumentParser, default_template: str) -> None:
    parser.add_argument("--model", required=True, type=Path, help="CLOC model folder, or a training run")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the model folder)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for metrics.json")
    parser.add_argument(
        "--template",
        action="append",
        help=f"class-name prompt with one '{{}}' (repeat for an ensemble; default {default_template!r})",
    )
    parser.add_argument("--ensemble", action="store_true", help="CLIP's 7-template ensemble (averaged embeddings)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per ViT pass (default 32)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype (default float32)")
    parser.add_argument("--num-workers", type=int, default=0, help="image-loading worker processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_parser(subparsers: Any) -> None:
    """Register ``encoder-zeroshot`` with its ``coco``, ``lvis`` and ``folder`` subcommands."""
    parser = subparsers.add_parser(
        "encoder-zeroshot",
        help="CLOC encoder zero-shot: COCO/LVIS region classification (mAcc), folder image classification",
        description="Zero-shot evaluation of a CLOC encoder alone (docs/evaluation_encoder.md).",
    )
    kinds = parser.add_subparsers(dest="zeroshot_task", required=True, metavar="TASK")
    for kind, what in (("coco", "instances_<split>.json"), ("lvis", "lvis_v1_<split>.json")):
        sub = kinds.add_parser(kind, help=f"region classification on ground-truth boxes of {what}")
        sub.add_argument("--instances", required=True, type=Path, help=what)
        images_help = "image folder (val2017)" if kind == "coco" else "COCO root holding train2017/ and val2017/"
        sub.add_argument("--images", required=True, type=Path, help=images_help)
        if kind == "coco":
            sub.add_argument("--include-crowd", action="store_true", help="also classify iscrowd boxes")
        _common(sub, REGION_TEMPLATES[0])
        sub.set_defaults(run=run_zeroshot, zeroshot_kind=kind)
    folder = kinds.add_parser("folder", help="image classification on a class-per-subfolder tree (ImageNet style)")
    folder.add_argument("--folder", required=True, type=Path, help="root with one subfolder of images per class")
    folder.add_argument("--classnames", type=Path, help="class names: .txt (lines) or .json mapping (needed for wnids)")
    folder.add_argument("--resize-mode", choices=("pad", "crop", "squash"), help="default: the model's (pad)")
    _common(folder, IMAGE_TEMPLATES[0])
    folder.set_defaults(run=run_zeroshot, zeroshot_kind="folder")


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _templates(args: argparse.Namespace) -> tuple[str, ...]:
    if args.ensemble and args.template:
        raise ValueError("give --template or --ensemble, not both")
    if args.ensemble:
        return ENSEMBLE_TEMPLATES
    default = IMAGE_TEMPLATES if args.zeroshot_kind == "folder" else REGION_TEMPLATES
    return check_templates(args.template or default)


def _load_model(args: argparse.Namespace) -> tuple[CLOCModel, Any]:
    args.model = resolve_model_folder(args.model)
    tokenizer_dir = args.tokenizer or args.model
    for name, path in (("model", args.model), ("tokenizer", tokenizer_dir)):
        if not path.is_dir():
            raise ValueError(f"--{name} {path}: not a folder")
    try:
        model = CLOCModel.from_pretrained(args.model, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"could not load a CLOC model and tokenizer from {args.model}: {error}") from error
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device=device, dtype=DTYPES[args.dtype]), tokenizer


def _evaluate(args: argparse.Namespace, model: CLOCModel, tokenizer: Any, templates: tuple[str, ...]) -> dict:
    common = {
        "templates": templates,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "progress": not args.no_progress,
    }
    if args.zeroshot_kind == "folder":
        dataset = load_image_folder(args.folder, args.classnames, args.limit)
        if not dataset.paths:
            raise ValueError(f"{args.folder}: no image files in the class folders")
        options = {} if args.resize_mode is None else {"resize_mode": args.resize_mode}
        processor = CLOCImageProcessor.for_model(model.config, **options)
        metrics = evaluate_image_zeroshot(model, tokenizer, dataset, processor=processor, **common)
        metrics["run"] = {"folder": str(args.folder), "classnames": args.classnames and str(args.classnames)}
        return metrics
    instances = load_instance_set(
        args.instances, args.images, args.zeroshot_kind, getattr(args, "include_crowd", False)
    )
    records = instances.records[: args.limit] if args.limit is not None else instances.records
    if not records:
        raise ValueError(f"{args.instances}: no image with a usable box")
    metrics = evaluate_region_zeroshot(model, tokenizer, records, instances.class_names, **common)
    metrics["conversion"] = instances.report.to_dict()
    metrics["run"] = {"instances": str(args.instances), "images": str(args.images)}
    return metrics


def run_zeroshot(args: argparse.Namespace) -> int:
    """Load the encoder and the data, evaluate, write ``OUT/metrics.json`` and print the table."""
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        return _error("--batch-size and --limit must be positive")
    try:
        templates = _templates(args)
        model, tokenizer = _load_model(args)
        metrics = _evaluate(args, model, tokenizer, templates)
    except (ConversionError, FileNotFoundError, ValueError) as error:
        return _error(str(error))
    metrics["run"].update(
        task=args.zeroshot_kind, model=str(args.model), limit=args.limit, device=str(next(model.parameters()).device)
    )
    metrics["run"]["dtype"] = args.dtype
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(format_zeroshot_metrics(metrics, TITLES[args.zeroshot_kind]))
    print(f"wrote {path}")
    if metrics["num_images"] == 0:
        print("error: no image could be read; nothing was evaluated", file=sys.stderr)
        return 1
    return 0


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def format_zeroshot_metrics(metrics: dict[str, Any], title: str = "Zero-shot") -> str:
    """A one-screen table of a region or image zero-shot result (scores in percent)."""
    lines = [
        f"{title}: {metrics['num_images']} images ({metrics['num_skipped_images']} skipped)",
        f"{'metric':<28}{'score':>8}{'n':>10}",
        "-" * 46,
    ]
    if "region_classification" in metrics:
        result = metrics["region_classification"]
        lines.append(f"{'region mAcc':<28}{_percent(result['mean_class_accuracy']):>8}{result['num_classes']:>10}")
        lines.append(f"{'region accuracy':<28}{_percent(result['accuracy']):>8}{result['num_regions']:>10}")
        lines.append(f"candidate classes: {metrics['num_candidate_classes']}")
    else:
        result = metrics["classification"]
        for key in sorted((k for k in result if re.fullmatch(r"top\d+", k)), key=lambda k: int(k[3:])):
            lines.append(f"{key + ' accuracy':<28}{_percent(result[key]):>8}{result['num_images']:>10}")
        count = result["num_classes_with_images"]
        lines.append(f"{'mean class accuracy':<28}{_percent(result['mean_class_accuracy']):>8}{count:>10}")
        lines.append(f"classes: {metrics['num_classes']}")
    templates = metrics["settings"]["templates"]
    lines.append(
        f"templates: {templates[0]!r}" + (f" and {len(templates) - 1} more (averaged)" if len(templates) > 1 else "")
    )
    for example in metrics["skipped_images"][:3]:
        lines.append(f"skipped {example['image']}: {example['error']}")
    return "\n".join(lines)


__all__ = ["add_parser", "format_zeroshot_metrics", "run_zeroshot"]
