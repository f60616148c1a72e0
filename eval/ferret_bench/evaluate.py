"""``python -m eval ferret-bench``: answer the Ferret-Bench questions with a CLOC-LLaVA model, have an LLM judge
compare each answer with GPT-4's, and report Ferret's relative scores. Data, prompts and scores:
:mod:`eval.ferret_bench.task`; the judge client: :mod:`eval.judge`.

Writes, under ``--out``: ``predictions.jsonl`` (appended as produced; a rerun resumes), ``judge_cache.jsonl``
(accepted judge replies by request hash; a rerun pays only for what is missing), ``reviews.jsonl`` (one line per
question: scores ``[reference, model]`` or the failure), ``metrics.json``, ``metrics.md`` and ``eval_run.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from eval.ferret_bench.task import (
    TASKS,
    FerretItem,
    answer_for_judge,
    ferret_question,
    ferret_scores,
    load_ferret_bench,
    load_rules,
    review_messages,
)
from eval.judge import ChatJudge, JudgeError, JudgeSettings, parse_two_scores
from eval.mllm_cli import (
    SetupError,
    add_model_arguments,
    check_positive,
    generation_settings,
    load_model,
    report_error,
)
from eval.mllm_generation import (
    GenerationSettings,
    PredictionStore,
    TooManyFailuresError,
    answer_questions,
    claim_output_folder,
    model_identity,
)
from eval.predictions import is_failed
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
from mllm.box_codec import BoxCodec


def judge_answers(
    items: Sequence[FerretItem],
    predictions: Mapping[str, Mapping[str, Any]],
    rules: Mapping[str, Mapping[str, str]],
    judge: ChatJudge,
    codec: BoxCodec,
    workers: int = 4,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One review per item, in order: ``status`` ``judged`` with ``scores`` ``[reference, model]``, else
    ``unanswered`` (no answer: its image could not be read; asked again on the next run) or ``judge_failed`` (no
    reply held two scores), with an ``error``.
    Raises :class:`~eval.judge.JudgeError` when the endpoint fails."""

    def review(item: FerretItem) -> dict[str, Any]:
        prediction = predictions.get(item.id, {})
        answer = prediction.get("answer")
        entry: dict[str, Any] = {"id": item.id, "task": item.task, "category": item.category}
        entry["question_id"] = item.question_id
        if answer is None:
            error = prediction.get("error") if is_failed(prediction) else None
            return {**entry, "status": "unanswered", "scores": None, "error": f"no answer ({error or 'missing'})"}
        shown = answer_for_judge(answer, item.category, codec)
        outcome = judge.judge(review_messages(item, shown, rules[item.category]), parse_two_scores)
        status = "judged" if outcome.parsed is not None else "judge_failed"
        scores = list(outcome.parsed) if outcome.parsed is not None else None
        return {
            **entry,
            "status": status,
            "answer": shown,
            "scores": scores,
            "review": outcome.content,
            "error": outcome.error,
        }

    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        return list(tqdm(pool.map(review, items), total=len(items), desc="judge", disable=not progress))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a JudgeError, ask nothing more


def evaluate_ferret_bench(
    model: CLOCLlavaForConditionalGeneration,
    processor: CLOCLlavaProcessor,
    items: Sequence[FerretItem],
    rules: Mapping[str, Mapping[str, str]],
    images_dir: str | Path,
    judge: ChatJudge,
    out_dir: str | Path,
    settings: GenerationSettings | None = None,
    workers: int = 4,
    progress: bool = True,
    identity: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Answer (resuming from ``out_dir/predictions.jsonl``), judge (through ``judge``'s cache) and score every item;
    writes ``reviews.jsonl``, ``metrics.json`` and ``metrics.md`` and returns the metrics. ``identity`` (model and
    data) is recorded in ``out_dir``; a rerun with another identity or settings raises ``ValueError``. In a
    data-parallel run (:mod:`eval.distributed`) only rank 0 judges, once every answer is merged; the other ranks
    return ``None``."""
    out = Path(out_dir)
    settings = settings or GenerationSettings(max_new_tokens=512, batch_size=8)
    claim_output_folder(
        out,
        {
            "benchmark": "ferret-bench",
            "model": identity or {"class": type(model).__name__},
            "settings": settings.identity(),
            "box_codec": processor.box_codec,
        },
        model,
    )
    questions = [ferret_question(item, images_dir, processor) for item in items]
    store = PredictionStore(out / "predictions.jsonl")
    predictions = answer_questions(model, processor, questions, store, settings, progress=progress)
    if predictions is None:  # not rank 0 of a data-parallel run: rank 0 judges and scores
        return None
    reviews = judge_answers(items, predictions, rules, judge, processor.codec, workers, progress)
    tasks = list(dict.fromkeys(item.task for item in items))
    pairs = {t: [tuple(r["scores"]) for r in reviews if r["task"] == t and r["status"] == "judged"] for t in tasks}
    metrics = ferret_scores(pairs)  # type: ignore[arg-type]
    for task in tasks:
        mine = [r for r in reviews if r["task"] == task]
        metrics[task]["num_questions"] = len(mine)
        metrics[task]["unanswered"] = sum(1 for r in mine if r["status"] == "unanswered")
        metrics[task]["judge_failed"] = sum(1 for r in mine if r["status"] == "judge_failed")
    metrics["judge_model"] = judge.settings.model
    with open(out / "reviews.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in reviews)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out / "metrics.md").write_text(format_ferret_metrics(metrics) + "\n", encoding="utf-8")
    return metrics


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def format_ferret_metrics(metrics: Mapping[str, Any]) -> str:
    """A markdown table of :func:`evaluate_ferret_bench`'s metrics."""
    lines = [
        "| task | score | model mean | reference mean | judged | judge failed | unanswered |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for task in TASKS:
        m = metrics.get(task)
        if m:
            lines.append(
                f"| {task} | {_percent(m['score'])} | {m['model_mean']:.2f} | {m['reference_mean']:.2f} | "
                f"{m['judged']} | {m.get('judge_failed', 0)} | {m.get('unanswered', 0)} |"
            )
    lines.append(f"| **average** | {_percent(metrics['average'])} | | | | | |")
    lines.append("")
    lines.append(
        f"Score = mean model score / mean reference (GPT-4) score × 100, judged by {metrics.get('judge_model')}; "
        f"pooled over all questions: {_percent(metrics['all_pooled'])}."
    )
    return "\n".join(lines)


def add_parser(subparsers: Any) -> None:
    """Register ``ferret-bench`` on the ``python -m eval`` subcommands."""
    parser = subparsers.add_parser(
        "ferret-bench",
        help="CLOC-LLaVA: Ferret-Bench referring/grounding conversation, judged by an OpenAI-compatible LLM",
        description="Answer Ferret-Bench, judge each answer against GPT-4's with an LLM, report Ferret's relative "
        "scores (docs/evaluation.md).",
    )
    parser.add_argument("--data", required=True, type=Path, help="ml-ferret's ferret_gpt4_data folder")
    parser.add_argument("--images", required=True, type=Path, help="folder of the COCO 2017 images it names")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated (default {','.join(TASKS)})")
    parser.add_argument("--limit", type=int, help="only the first N questions of each task")
    parser.add_argument(
        "--judge-base-url",
        default=os.environ.get("OPENAI_BASE_URL"),
        help="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1 (default $OPENAI_BASE_URL)",
    )
    parser.add_argument("--judge-model", default=os.environ.get("JUDGE_MODEL"), help="judge (default $JUDGE_MODEL)")
    parser.add_argument(
        "--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key (unset: none)"
    )
    parser.add_argument("--judge-workers", type=int, default=4, help="parallel judge requests (default 4)")
    parser.add_argument("--judge-retries", type=int, default=5, help="retries of a failed request (default 5)")
    parser.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per request (default 120)")
    parser.add_argument("--judge-cache", type=Path, help="judge reply cache (default OUT/judge_cache.jsonl)")
    add_model_arguments(parser, batch_size=8, max_new_tokens=512)
    parser.set_defaults(run=run_ferret_bench)


def _judge(args: argparse.Namespace) -> ChatJudge:
    if not args.judge_base_url or not args.judge_model:
        raise SetupError("give the judge's --judge-base-url and --judge-model (or $OPENAI_BASE_URL, $JUDGE_MODEL)")
    check_positive(args, "judge_workers")
    settings = JudgeSettings(
        base_url=args.judge_base_url,
        model=args.judge_model,
        api_key=os.environ.get(args.judge_api_key_env) or None,
        timeout=args.judge_timeout,
        max_retries=max(0, args.judge_retries),
    )
    return ChatJudge(settings, args.judge_cache or args.out / "judge_cache.jsonl")


def run_ferret_bench(args: argparse.Namespace) -> int:
    """Load data, model and judge; answer, judge, score; print and write the metrics."""
    tasks = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))
    try:
        check_positive(args, "batch_size", "max_new_tokens", "limit")
        items = load_ferret_bench(args.data, tasks, args.limit)
        rules = load_rules(args.data)
        if not args.images.is_dir():
            raise SetupError(f"--images {args.images}: not a folder")
        judge = _judge(args)
        settings = generation_settings(args)
        model, processor = load_model(args)
        data = {"data": str(args.data.resolve()), "images": str(args.images.resolve()), "tasks": tasks}
        metrics = evaluate_ferret_bench(
            model,
            processor,
            items,
            rules,
            args.images,
            judge,
            args.out,
            settings=settings,
            workers=args.judge_workers,
            progress=not args.no_progress,
            identity={**model_identity(args.model), **data, "limit": args.limit},
        )
    except (SetupError, FileNotFoundError, ValueError) as error:
        return report_error(str(error))
    except TooManyFailuresError as error:
        return report_error(str(error), status=1)
    except JudgeError as error:
        return report_error(f"judge: {error} (rerun to resume: answers and accepted reviews are kept)")
    if metrics is None:  # not rank 0 of a data-parallel run
        return 0
    print(format_ferret_metrics(metrics))
    print(f"wrote {args.out / 'metrics.json'} ({judge.requests_made} judge requests)")
    failed = sum(metrics[t]["judge_failed"] + metrics[t]["unanswered"] for t in tasks)
    if failed:
        print(f"warning: {failed} questions were not scored (see reviews.jsonl)", file=sys.stderr)
    if not any(metrics[t]["judged"] for t in tasks):
        print("error: no question could be judged", file=sys.stderr)
        return 1
    return 0


__all__ = ["add_parser", "evaluate_ferret_bench", "format_ferret_metrics", "judge_answers", "run_ferret_bench"]
