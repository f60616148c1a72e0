"""``python -m eval refcoco`` (REC) and ``python -m eval reg`` (REG) on RefCOCO / RefCOCO+ / RefCOCOg or a region-text
split (``docs/evaluation.md``).

    python -m eval refcoco --model DIR --data DIR --dataset refcoco --split val [--format auto] [--prompt default]
        [--images DIR] [--expressions all|first] [--batch-size N] [--limit N] --out DIR
    python -m eval reg --model DIR --data DIR --dataset refcocog --split val [--tokenizer auto] [--no-meteor] --out DIR

Exit status: 0 on success, 1 when nothing could be evaluated (every image missing or unreadable) or more answers
failed than ``--max-failed-fraction`` allows, 2 on a missing or unreadable model or data, or a bad flag.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cloc_encoder.data.converters.common import ConversionReport
from eval.caption_metrics import TOKENIZERS, resolve_tokenizer
from eval.mllm_cli import (
    SetupError,
    add_model_arguments,
    check_positive,
    generation_settings,
    load_model,
    report_error,
    report_not_evaluated,
)
from eval.mllm_generation import TooManyFailuresError, model_identity
from eval.refcoco.data import DATASETS, FORMATS, SPLITS, RefSample, images_folder, read_ref_samples
from eval.refcoco.evaluate import (
    REC_PROMPTS,
    REG_PROMPTS,
    evaluate_rec,
    evaluate_reg,
    format_rec_metrics,
    format_reg_metrics,
)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="folder of the refer / MDETR / lmms-lab parquet files, or a region-text .jsonl (synthetic world)",
    )
    parser.add_argument("--dataset", choices=DATASETS, help="refcoco, refcoco+ or refcocog (not for region-text)")
    parser.add_argument("--split", choices=SPLITS, help="val, testA, testB (refcoco/+), test (refcocog)")
    parser.add_argument("--format", choices=("auto", *FORMATS), default="auto", help="data layout (default: detect)")
    parser.add_argument(
        "--split-by", choices=("unc", "google", "umd"), help="refer layout: refs(<split-by>).p (default unc; umd)"
    )
    parser.add_argument("--images", type=Path, help="COCO train2014 image folder (refer/mdetr; default: searched)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N objects")


def add_refcoco_parsers(subparsers: Any) -> None:
    """Register the ``refcoco`` (REC) and ``reg`` (referring description) subcommands."""
    rec = subparsers.add_parser(
        "refcoco",
        help="CLOC-LLaVA: RefCOCO/+/g referring expression comprehension (expression -> box), Acc@0.5",
        description="Referring expression comprehension on RefCOCO/RefCOCO+/RefCOCOg (docs/evaluation.md). "
        "Predictions are appended to OUT/predictions_rec.jsonl; a rerun resumes.",
    )
    _add_data_arguments(rec)
    rec.add_argument("--prompt", choices=REC_PROMPTS, default="default", help="question wording")
    rec.add_argument("--expressions", choices=("all", "first"), default="all", help="questions per object")
    add_model_arguments(rec, batch_size=16, max_new_tokens=32)
    rec.set_defaults(run=run_rec)

    reg = subparsers.add_parser(
        "reg",
        help="CLOC-LLaVA: referring description of a given box (RefCOCOg-style), BLEU-4/METEOR/ROUGE-L/CIDEr",
        description="Describe a given region (its box for the prompter) and score the answer against the "
        "object's referring expressions (docs/evaluation.md). Predictions go to OUT/predictions_reg.jsonl.",
    )
    _add_data_arguments(reg)
    reg.add_argument("--prompt", choices=REG_PROMPTS, default="default", help="question wording")
    reg.add_argument(
        "--tokenizer", choices=TOKENIZERS, default="auto", help="caption tokenizer: ptb (Java), simple, auto"
    )
    reg.add_argument("--no-meteor", action="store_true", help="skip METEOR (it starts a Java process, ~15 s)")
    add_model_arguments(reg, batch_size=16, max_new_tokens=48)
    reg.set_defaults(run=run_reg)


def _read(args: argparse.Namespace) -> tuple[list[RefSample], str, ConversionReport]:
    try:
        samples, used, report = read_ref_samples(
            args.data,
            format=args.format,
            dataset=args.dataset,
            split=args.split,
            split_by=args.split_by,
            images_dir=args.images,
            cache_dir=args.out / "image_cache",
            limit=args.limit,
        )
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise SetupError(str(error)) from error
    if report.skipped:
        print(report.summary(), file=sys.stderr)
    if not samples:
        raise SetupError(f"{args.data}: no samples to evaluate")
    return samples, used, report


def _run_description(
    args: argparse.Namespace, used: str, report: ConversionReport
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(identity, info)``: what the output folder is claimed for, and what the metrics record about the data."""
    data = {"path": str(args.data.resolve()), "format": used, "limit": args.limit}
    if used != "regiontext":
        data.update(dataset=args.dataset, split=args.split, split_by=args.split_by)
    if used in ("refer", "mdetr"):
        data["images"] = str(images_folder(args.data, used, args.dataset, args.images))
    if used == "regiontext":
        info = {"dataset": args.data.name, "split": None, "format": used}
    else:
        info = {"dataset": args.dataset, "split": args.split, "format": used}
    info.update(data=data, skipped=dict(report.skipped))
    return {"model": model_identity(args.model), "data": data}, info


def _finish(args: argparse.Namespace, metrics: dict[str, Any], table: str, scores: dict[str, Any]) -> int:
    print(table)
    print(f"wrote {args.out / 'metrics.json'}")
    return report_not_evaluated(scores["not_evaluated"], scores["num_questions"])


def _setup(args: argparse.Namespace) -> tuple:
    """What REC and REG both start from: checked flags, the split's samples, the model and processor, the run's
    identity and description, the decoding settings."""
    check_positive(args, "batch_size", "max_new_tokens", "limit")
    settings = generation_settings(args)
    samples, used, report = _read(args)
    model, processor = load_model(args)
    identity, info = _run_description(args, used, report)
    return samples, model, processor, identity, info, settings


def run_rec(args: argparse.Namespace) -> int:
    """``python -m eval refcoco``: read the split, load the model, answer and score, write the metrics."""
    try:
        samples, model, processor, identity, info, settings = _setup(args)
        metrics = evaluate_rec(
            model,
            processor,
            samples,
            args.out,
            prompt=args.prompt,
            expressions=args.expressions,
            settings=settings,
            identity=identity,
            info=info,
            progress=not args.no_progress,
        )
    except (SetupError, ValueError) as error:
        return report_error(str(error))
    except TooManyFailuresError as error:
        return report_error(str(error), status=1)
    if metrics is None:  # not rank 0 of a data-parallel run
        return 0
    return _finish(args, metrics, format_rec_metrics(metrics), metrics["rec"])


def run_reg(args: argparse.Namespace) -> int:
    """``python -m eval reg``: read the split, load the model, describe each region, score, write the metrics."""
    try:
        tokenizer = resolve_tokenizer(args.tokenizer)
    except RuntimeError as error:  # --tokenizer ptb without Java
        return report_error(str(error))
    try:
        samples, model, processor, identity, info, settings = _setup(args)
        metrics = evaluate_reg(
            model,
            processor,
            samples,
            args.out,
            prompt=args.prompt,
            settings=settings,
            tokenizer=tokenizer,
            meteor=not args.no_meteor,
            identity=identity,
            info=info,
            progress=not args.no_progress,
        )
    except (SetupError, ValueError) as error:
        return report_error(str(error))
    except TooManyFailuresError as error:
        return report_error(str(error), status=1)
    if metrics is None:  # not rank 0 of a data-parallel run
        return 0
    return _finish(args, metrics, format_reg_metrics(metrics), metrics["reg"])


__all__ = ["add_refcoco_parsers", "run_rec", "run_reg"]
