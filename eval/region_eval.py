"""Evaluate a CLOC-LLaVA model on the grounding and referring questions of a region-text split.

Writes, under ``out_dir``: ``predictions_<task>.jsonl`` (appended as produced; a rerun resumes), ``metrics.json``
and ``metrics.md``. See :mod:`eval.region_tasks` for the questions and scores.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cloc_encoder.data.format import RegionTextRecord
from eval.mllm_generation import GenerationSettings, PredictionStore, answer_questions, claim_output_folder
from eval.region_tasks import (
    constant_box_baselines,
    grounding_questions,
    referring_questions,
    score_grounding,
    score_referring,
)
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor

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
) -> dict[str, Any]:
    """Answer and score the questions of ``tasks`` on ``records``; ``train_records`` (optional) adds the constant-box
    grounding baselines. Returns (and writes) the metrics.

    ``identity`` (e.g. :func:`~eval.mllm_generation.model_identity` of the model folder) is recorded with the
    settings in ``out_dir``; a rerun with a different model or settings raises instead of resuming."""
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
            "settings": dataclasses.asdict(settings),
            "expressions": expressions,
            "box_codec": processor.box_codec,
        },
    )
    codec = processor.codec
    metrics: dict[str, Any] = {}
    for task in tasks:
        if task == "grounding":
            questions, targets = grounding_questions(records, expressions)
        else:
            questions, targets = referring_questions(records, codec)
        store = PredictionStore(out / f"predictions_{task}.jsonl")
        predictions = answer_questions(model, processor, questions, store, settings, progress=progress)
        if task == "grounding":
            metrics[task] = score_grounding(predictions, targets, codec)
            if train_records:
                metrics[task]["baselines"] = constant_box_baselines(train_records, targets)
        else:
            metrics[task] = score_referring(predictions, targets)
        metrics[task]["unreadable_images"] = sum(1 for p in predictions.values() if p.get("error"))
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
    return "\n".join(lines)


__all__ = ["REGION_TASKS", "evaluate_regions", "format_region_metrics"]
