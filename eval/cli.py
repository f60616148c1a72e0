"""Command line of the evaluation harnesses: one subcommand per benchmark.

    python -m eval encoder --model DIR --data FILE_OR_DIR --out DIR [--tokenizer DIR] [--batch-size N] [--limit N]
    python -m eval regions --model DIR --data FILE_OR_DIR --out DIR [--tasks grounding,referring]
        [--train-data FILE_OR_DIR] [--batch-size N] [--limit N] [--max-new-tokens N]

Exit status: 0 on success, 1 when nothing could be evaluated (every image missing or unreadable), 2 on a missing
or unreadable model, tokenizer or data file. ``metrics.json`` is written whenever evaluation ran.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from cloc_encoder import CLOCModel
from cloc_encoder.data.format import ReadReport, read_region_text
from cloc_encoder.run_folder import resolve_model_folder
from eval.encoder.evaluate import DEFAULT_CLASS_PROMPT, evaluate_encoder, format_encoder_metrics
from eval.ferret_bench.evaluate import add_parser as add_ferret_bench_parser
from eval.flickr30k.evaluate import add_parser as add_flickr30k_parser
from eval.plot_predictions import add_parser as add_plot_parser
from eval.refcoco.cli import add_refcoco_parsers
from eval.regions.evaluate import add_parser as add_regions_parser
from eval.zeroshot.cli import add_parser as add_zeroshot_parser

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_encoder_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "encoder",
        help="CLOC encoder: region classification, region/image-text retrieval, text->box grounding",
        description="Evaluate a CLOC encoder on a region-text split (docs/evaluation_encoder.md).",
    )
    parser.add_argument(
        "--model", required=True, type=Path, help="CLOC model folder, or a training run (its latest checkpoint)"
    )
    parser.add_argument("--data", required=True, type=Path, help="region-text JSONL file or folder of shards")
    parser.add_argument("--out", required=True, type=Path, help="output folder for metrics.json")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the model folder)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per ViT pass (default 32)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N records")
    parser.add_argument(
        "--class-prompt",
        default=DEFAULT_CLASS_PROMPT,
        help=f"template for class names, e.g. 'a photo of a {{}}.' (default {DEFAULT_CLASS_PROMPT!r})",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype (default float32)")
    parser.add_argument("--num-workers", type=int, default=0, help="image-loading worker processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run_encoder)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description="CLOC-MLLM evaluation harnesses.")
    parser.set_defaults(launch=None)  # the CLOC-LLaVA commands' data-parallel launch (eval.mllm_cli.load_model)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_encoder_parser(subparsers)
    add_zeroshot_parser(subparsers)
    add_regions_parser(subparsers)
    add_flickr30k_parser(subparsers)
    add_ferret_bench_parser(subparsers)
    add_refcoco_parsers(subparsers)
    add_plot_parser(subparsers)
    return parser


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run_encoder(args: argparse.Namespace) -> int:
    """``python -m eval encoder``: load model, tokenizer and records, evaluate, write ``metrics.json``."""
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        return _error("--batch-size and --limit must be positive")
    args.model = resolve_model_folder(args.model)
    tokenizer_dir = args.tokenizer or args.model
    for name, path in (("model", args.model), ("tokenizer", tokenizer_dir)):
        if not path.is_dir():
            return _error(f"--{name} {path}: not a folder")
    try:
        model = CLOCModel.from_pretrained(args.model, local_files_only=True)
    except (OSError, ValueError) as error:
        return _error(f"could not load a CLOC model from {args.model}: {error}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as error:
        return _error(f"could not load a tokenizer from {tokenizer_dir}: {error}")
    report = ReadReport()
    try:
        records = read_region_text(args.data, report=report)
    except FileNotFoundError as error:
        return _error(str(error))
    if report.skipped:
        print(f"{args.data}: {report.summary()}; first: {report.skipped[0]}", file=sys.stderr)
    if args.limit is not None:
        records = records[: args.limit]
    if not records:
        return _error(f"{args.data}: no region-text records to evaluate")

    device = args.device or _default_device()
    model.to(device=device, dtype=DTYPES[args.dtype])
    metrics = evaluate_encoder(
        model,
        tokenizer,
        records,
        batch_size=args.batch_size,
        class_prompt=args.class_prompt,
        num_workers=args.num_workers,
        progress=not args.no_progress,
    )
    metrics["run"] = {
        "model": str(args.model),
        "tokenizer": str(tokenizer_dir),
        "data": str(args.data),
        "records": len(records),
        "malformed_records": len(report.skipped),
        "limit": args.limit,
        "device": str(device),
        "dtype": args.dtype,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(format_encoder_metrics(metrics))
    print(f"wrote {path}")
    if metrics["num_images"] == 0:
        print("error: no image could be read; nothing was evaluated", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the exit status. Under ``torchrun`` / ``accelerate
    launch`` the CLOC-LLaVA commands run data-parallel (``docs/evaluation.md``, "Many GPUs")."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    finally:
        if args.launch is not None:
            args.launch.shutdown()


if __name__ == "__main__":
    sys.exit(main())
