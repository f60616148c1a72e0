"""Evaluate a CLOC-LLaVA model on the grounding and referring questions of a region-text split
(``python -m eval regions``).

Writes, under ``out_dir``: ``predictions_<task>.jsonl`` (appended as produced; a rerun resumes), ``metrics.json``
and ``metrics.md``. See :mod:`eval.regions.tasks` for the questions and scores.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cloc_encoder.data.format import ReadReport, RegionTextRecord, read_region_text
from eval.distributed import is_main_process
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
    not_evaluated_note,
)
from eval.predictions import failed_ids, without_failed
from eval.regions.tasks import (
    constant_box_baselines,
    grounding_questions,
    referring_questions,
    score_grounding,
    score_referring,
)
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
from mllm.prompts import DEFAULT_WORDING, WORDINGS

REGION_TASKS = ("grounding", "referring")


def evaluate_regions(
    model: CLOCLlavaForConditionalGeneration,
    processor: CLOCLlavaProcessor,
    records: Sequence[RegionTextRecord],
    out_dir: str | Path,
    tasks: Sequence[str] = REGION_TASKS,
    settings: GenerationSettings | None = None,
    train_records: Sequence[RegionTextRecord] | None = None,
    expressions: str = "first",
    progress: bool = True,
    identity: dict[str, Any] | None = None,
    wording: str = DEFAULT_WORDING,
) -> dict[str, Any] | None:
    """Answer and score the questions of ``tasks`` on ``records``; ``train_records`` (optional) adds the constant-box
    grounding baselines; ``wording`` names how the questions are asked (:data:`mllm.prompts.WORDINGS`). Returns
    (and writes) the metrics; ``None`` on the ranks other than 0 of a data-parallel run (:mod:`eval.distributed`),
    which only answer their share.

    ``identity`` (e.g. :func:`~eval.mllm_generation.model_identity` of the model folder) is recorded with the
    settings and the model's dtype and attention implementation in ``out_dir``; a rerun with a different model or
    settings raises instead of resuming. Questions whose image could not be read are not scored: each task's
    ``not_evaluated`` counts them (they are asked again on the next run)."""
    unknown = [t for t in tasks if t not in REGION_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(REGION_TASKS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings or GenerationSettings()
    claim_output_folder(
        out,
        {
            "model": identity or {"class": type(model).__name__},
            "settings": settings.identity(),
            "expressions": expressions,
            "box_codec": processor.box_codec,
            **({"wording": wording} if wording != DEFAULT_WORDING else {}),
        },
        model,
    )
    codec = processor.codec
    metrics: dict[str, Any] = {}
    for task in tasks:
        if task == "grounding":
            questions, targets = grounding_questions(records, expressions, wording)
        else:
            questions, targets = referring_questions(records, codec, wording)
        store = PredictionStore(out / f"predictions_{task}.jsonl")
        predictions = answer_questions(model, processor, questions, store, settings, progress=progress)
        if predictions is None:  # not rank 0 of a data-parallel run: rank 0 scores
            continue
        scored = without_failed(targets, predictions)
        if task == "grounding":
            metrics[task] = score_grounding(predictions, scored, codec)
            if train_records:
                metrics[task]["baselines"] = constant_box_baselines(train_records, scored)
        else:
            metrics[task] = score_referring(predictions, scored)
        metrics[task]["not_evaluated"] = len(failed_ids(predictions))
    if not is_main_process():
        return None
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out / "metrics.md").write_text(format_region_metrics(metrics) + "\n", encoding="utf-8")
    return metrics


def format_region_metrics(metrics: dict[str, Any]) -> str:
    """A markdown table of :func:`evaluate_regions`' metrics."""
    lines = ["| task | metric | model | baseline |", "|---|---|---:|---:|"]
    grounding = metrics.get("grounding")
    if grounding:
        baselines = grounding.get("baselines", {})
        best = max((b["acc@0.5"] for b in baselines.values()), default=None)
        base = "–" if best is None else f"{100 * best:.1f}% (constant box)"
        lines.append(f"| grounding | Acc@0.5 | {100 * grounding['acc@0.5']:.1f}% | {base} |")
        lines.append(f"| grounding | mean IoU | {grounding['miou']:.3f} | |")
        lines.append(f"| grounding | questions (no box) | {grounding['num_questions']} ({grounding['no_box']}) | |")
    referring = metrics.get("referring")
    if referring:
        chance = f"{100 * referring['chance']:.1f}% (chance)"
        lines.append(f"| referring | names the category | {100 * referring['accuracy']:.1f}% | {chance} |")
        lines.append(f"| referring | questions | {referring['num_questions']} | |")
    not_evaluated = sum(m.get("not_evaluated", 0) for m in metrics.values())
    if note := not_evaluated_note(not_evaluated):
        lines += ["", note]
    return "\n".join(lines)


def add_parser(subparsers: Any) -> None:
    """Register ``python -m eval regions``."""
    parser = subparsers.add_parser(
        "regions",
        help="CLOC-LLaVA: grounding (expression -> box) and referring (box -> name) on a region-text split",
        description="Ask a CLOC-LLaVA model grounding and referring questions about a region-text split "
        "(docs/evaluation.md). Predictions are appended to OUT/predictions_<task>.jsonl; a rerun resumes.",
    )
    parser.add_argument("--data", required=True, type=Path, help="region-text JSONL file or folder of shards")
    parser.add_argument("--tasks", default=",".join(REGION_TASKS), help="comma-separated: grounding,referring")
    parser.add_argument("--train-data", type=Path, help="training split: adds the constant-box grounding baselines")
    parser.add_argument("--expressions", choices=("first", "all"), default="first", help="questions per region")
    parser.add_argument("--wording", choices=tuple(WORDINGS), default=DEFAULT_WORDING, help="how questions are asked")
    parser.add_argument("--limit", type=int, help="evaluate only the first N records")
    add_model_arguments(parser)
    parser.set_defaults(run=run)


def _read_records(path: Path, limit: int | None) -> list[RegionTextRecord]:
    report = ReadReport()
    try:
        records = read_region_text(path, report=report)
    except FileNotFoundError as error:
        raise SetupError(str(error)) from error
    if report.skipped:
        print(f"{path}: {report.summary()}; first: {report.skipped[0]}", file=sys.stderr)
    return records if limit is None else records[:limit]


def run(args: argparse.Namespace) -> int:
    """``python -m eval regions``: load the model and processor, answer and score, write the metrics."""
    try:
        check_positive(args, "batch_size", "max_new_tokens", "limit")
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks or any(t not in REGION_TASKS for t in tasks):
            raise SetupError(f"--tasks {args.tasks!r}: choose from {','.join(REGION_TASKS)}")
        records = _read_records(args.data, args.limit)
        train_records = _read_records(args.train_data, None) if args.train_data else None
        if not records:
            raise SetupError(f"{args.data}: no region-text records to evaluate")
        settings = generation_settings(args)
        model, processor = load_model(args)
        metrics = evaluate_regions(
            model,
            processor,
            records,
            args.out,
            tasks=tasks,
            settings=settings,
            train_records=train_records,
            expressions=args.expressions,
            wording=args.wording,
            progress=not args.no_progress,
            identity={**model_identity(args.model), "data": str(args.data.resolve()), "limit": args.limit},
        )
    except (SetupError, ValueError) as error:
        return report_error(str(error))
    except TooManyFailuresError as error:
        return report_error(str(error), status=1)
    if metrics is None:  # not rank 0 of a data-parallel run
        return 0
    print(format_region_metrics(metrics))
    print(f"wrote {args.out / 'metrics.json'}")
    not_evaluated = sum(m["not_evaluated"] for m in metrics.values())
    return report_not_evaluated(not_evaluated, sum(m["num_questions"] for m in metrics.values()))


__all__ = ["REGION_TASKS", "add_parser", "evaluate_regions", "format_region_metrics", "run"]
