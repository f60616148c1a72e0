"""``python -m eval flickr30k``: phrase grounding Recall@1 of a CLOC-LLaVA model on Flickr30k Entities (or on a
region-text split, each region's expressions as phrases). Questions and scores: :mod:`eval.flickr30k.task`.

Writes, under ``--out``: ``predictions.jsonl`` (appended as produced; a rerun resumes), ``metrics.json``,
``metrics.md`` and ``eval_run.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cloc_encoder.data.format import ReadReport, read_region_text
from eval.flickr30k.task import (
    PROTOCOLS,
    SPLITS,
    PhraseSet,
    flickr_phrase_questions,
    is_flickr30k_folder,
    region_phrase_questions,
    score_phrases,
)
from eval.mllm_cli import (
    SetupError,
    add_model_arguments,
    check_positive,
    generation_settings,
    load_model,
    report_error,
    report_not_evaluated,
)
from eval.mllm_generation import (
    GenerationSettings,
    PredictionStore,
    TooManyFailuresError,
    answer_questions,
    claim_output_folder,
    model_identity,
)
from eval.predictions import failed_ids, without_failed
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor


def evaluate_phrase_grounding(
    model: CLOCLlavaForConditionalGeneration,
    processor: CLOCLlavaProcessor,
    phrases: PhraseSet,
    out_dir: str | Path,
    settings: GenerationSettings | None = None,
    protocol: str = "merged",
    progress: bool = True,
    identity: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Answer every phrase question (resuming from ``out_dir/predictions.jsonl``), score both protocols and write
    ``metrics.json`` / ``metrics.md``; ``recall@1`` is the chosen ``protocol``'s. ``identity`` (model and data) is
    recorded in ``out_dir`` with the model's dtype and attention implementation, and a rerun with another identity
    or settings raises ``ValueError``. Phrases whose image could not be read are not scored (``not_evaluated``;
    asked again on the next run). Returns ``None`` on the ranks other than 0 of a data-parallel run
    (:mod:`eval.distributed`)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}; choose from {PROTOCOLS}")
    out = Path(out_dir)
    settings = settings or GenerationSettings()
    claim_output_folder(
        out,
        {
            "benchmark": "flickr30k",
            "model": identity or {"class": type(model).__name__},
            "settings": settings.identity(),
            "box_codec": processor.box_codec,
        },
        model,
    )
    store = PredictionStore(out / "predictions.jsonl")
    predictions = answer_questions(model, processor, phrases.questions, store, settings, progress=progress)
    if predictions is None:  # not rank 0 of a data-parallel run: rank 0 scores
        return None
    scores = score_phrases(predictions, without_failed(phrases.targets, predictions), processor.codec)
    metrics: dict[str, Any] = {
        "protocol": protocol,
        "recall@1": scores[protocol]["recall@1"],
        "merged": scores["merged"],
        "any": scores["any"],
        "num_images": phrases.num_images,
        "num_phrases": scores["merged"]["num_phrases"],
        "no_box": scores["no_box"],
        "not_evaluated": len(failed_ids(predictions)),
        "skipped_phrases": dict(sorted(phrases.skipped.items())),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out / "metrics.md").write_text(format_flickr_metrics(metrics) + "\n", encoding="utf-8")
    return metrics


def format_flickr_metrics(metrics: dict[str, Any]) -> str:
    """A markdown table of :func:`evaluate_phrase_grounding`'s metrics (both protocols, per phrase type)."""
    merged, anybox = metrics["merged"], metrics["any"]
    lines = ["| phrases | Recall@1 (merged boxes) | Recall@1 (any box) |", "|---|---:|---:|"]
    rows = [("all", merged, anybox)]
    rows += [(name, item, anybox["by_type"][name]) for name, item in merged["by_type"].items()]
    for name, one, other in rows:
        lines.append(
            f"| {name} ({one['num_phrases']}) | {100 * one['recall@1']:.1f}% | {100 * other['recall@1']:.1f}% |"
        )
    skipped = ", ".join(f"{k} {v}" for k, v in metrics["skipped_phrases"].items()) or "none"
    lines.append("")
    lines.append(
        f"Headline protocol: {metrics['protocol']}. Answers without a box: {metrics['no_box']}; not evaluated "
        f"(image could not be read; asked again on the next run): {metrics['not_evaluated']}; phrases skipped "
        f"(no box): {skipped}."
    )
    return "\n".join(lines)


def add_parser(subparsers: Any) -> None:
    """Register ``flickr30k`` on the ``python -m eval`` subcommands."""
    parser = subparsers.add_parser(
        "flickr30k",
        help="CLOC-LLaVA: Flickr30k Entities phrase grounding (Recall@1, merged-box / any-box protocols)",
        description="Ask 'Where is <phrase>?' for every phrase with a box and score the first box of each answer "
        "(docs/evaluation.md). --data is a Flickr30k Entities folder or a region-text JSONL file/folder.",
    )
    parser.add_argument("--data", required=True, type=Path, help="Flickr30k Entities folder, or region-text data")
    parser.add_argument("--split", choices=SPLITS, default="test", help="Flickr30k Entities split (default test)")
    parser.add_argument("--images", type=Path, help="Flickr30k images folder (default DATA/flickr30k-images)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="merged", help="headline protocol (default merged)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images (records)")
    add_model_arguments(parser, batch_size=16, max_new_tokens=32)
    parser.set_defaults(run=run_flickr30k)


def _phrases(args: argparse.Namespace) -> tuple[PhraseSet, dict[str, Any]]:
    data = args.data.resolve()
    if is_flickr30k_folder(data):
        images = args.images.resolve() if args.images else None
        phrases = flickr_phrase_questions(data, args.split, images, args.limit)
        return phrases, {"data": str(data), "split": args.split, "images": str(images), "limit": args.limit}
    report = ReadReport()
    try:
        records = read_region_text(data, report=report)
    except FileNotFoundError as error:
        raise SetupError(f"--data {args.data}: neither a Flickr30k Entities folder nor region-text data") from error
    if report.skipped:
        print(f"{args.data}: {report.summary()}; first: {report.skipped[0]}", file=sys.stderr)
    records = records[: args.limit]
    return region_phrase_questions(records), {"data": str(data), "limit": args.limit}


def run_flickr30k(args: argparse.Namespace) -> int:
    """Load the model and phrases, answer, score, print and write the metrics."""
    try:
        check_positive(args, "batch_size", "max_new_tokens", "limit")
        phrases, data = _phrases(args)
        if not phrases.questions:
            raise SetupError(f"--data {args.data}: no phrase with a box to evaluate")
        settings = generation_settings(args)
        model, processor = load_model(args)
        metrics = evaluate_phrase_grounding(
            model,
            processor,
            phrases,
            args.out,
            settings=settings,
            protocol=args.protocol,
            progress=not args.no_progress,
            identity={**model_identity(args.model), **data},
        )
    except (SetupError, FileNotFoundError, ValueError) as error:
        return report_error(str(error))
    except TooManyFailuresError as error:
        return report_error(str(error), status=1)
    if metrics is None:  # not rank 0 of a data-parallel run
        return 0
    print(format_flickr_metrics(metrics))
    print(f"wrote {args.out / 'metrics.json'}")
    return report_not_evaluated(metrics["not_evaluated"], metrics["num_phrases"])


__all__ = ["add_parser", "evaluate_phrase_grounding", "format_flickr_metrics", "run_flickr30k"]
