"""RefCOCO-family benchmarks for a CLOC-LLaVA model: REC (expression → box) and REG (box → referring description).

- **REC**: one question per referring expression of every sample (``expressions="all"``, the standard protocol;
  ``"first"``: one per object). The first box written in the answer (the model's box codec,
  ``processor.codec``) is compared with the object's box, both ``xyxy`` normalised by the original image's width and
  height; a missing or malformed box is a miss (IoU 0); a question whose image could not be read is not scored
  (counted in ``not_evaluated``, asked again on the next run). Metrics: :func:`eval.regions.tasks.grounding_metrics`
  (Acc@0.5 headline, mean IoU, Acc@0.1…0.9, centre accuracy). Question ids: ``<sample id>-<expression index>``.
- **REG**: one question per sample, the region written ``[x1, y1, x2, y2] <region>``
  (``processor.format_region``) with its exact box for the prompter; the answer is scored against the sample's
  references with :func:`eval.caption_metrics.caption_metrics` (BLEU-4, METEOR, ROUGE-L, CIDEr). Question ids:
  the sample id.

Prompts (``REC_PROMPTS`` / ``REG_PROMPTS``) are the wordings of :data:`mllm.prompts.WORDINGS`: ``default`` is the
project's own, ``ferret``, ``llava`` and ``lmms_eval`` follow Ferret's, LLaVA-1.5's and lmms-eval's questions; a
wording that asks for 0–1 floats writes its regions with the float codec (answers are read either way,
:mod:`mllm.box_codec`).

Predictions are appended to ``predictions_<task>.jsonl`` under the output folder as they are produced and resumed by
id (:mod:`eval.mllm_generation`); the batch size does not change them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.caption_metrics import caption_metrics
from eval.mllm_generation import (
    GenerationSettings,
    PredictionStore,
    Question,
    answer_questions,
    claim_output_folder,
    not_evaluated_note,
)
from eval.predictions import failed_ids, without_failed
from eval.refcoco.data import RefSample
from eval.regions.tasks import GroundingTarget, score_grounding
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
from mllm.box_codec import get_box_codec
from mllm.prompts import WORDINGS, get_wording

REC_PROMPTS = tuple(WORDINGS)
REG_PROMPTS = tuple(WORDINGS)


def rec_question_text(prompt: str, expression: str) -> str:
    """The REC question for one expression in the wording ``prompt`` (``default`` adds an article, as the training
    conversations do)."""
    return get_wording(prompt).grounding_question(expression)


def rec_questions(
    samples: Sequence[RefSample], prompt: str = "default", expressions: str = "all"
) -> tuple[list[Question], dict[str, GroundingTarget]]:
    """One question per expression (``"all"``) or per sample (``"first"``), with its target box."""
    if expressions not in ("first", "all"):
        raise ValueError(f"expressions={expressions!r}; expected 'first' or 'all'")
    questions, targets = [], {}
    for sample in samples:
        chosen = sample.expressions[:1] if expressions == "first" else sample.expressions
        for index, expression in enumerate(chosen):
            question_id = f"{sample.id}-{index}"
            text = rec_question_text(prompt, expression)
            questions.append(Question(question_id, sample.image, text, target_box=sample.box))
            targets[question_id] = GroundingTarget(question_id, sample.box)
    return questions, targets


def reg_questions(
    samples: Sequence[RefSample], processor: CLOCLlavaProcessor, prompt: str = "default"
) -> tuple[list[Question], dict[str, tuple[str, ...]]]:
    """One question per sample with references, the region written by ``processor.format_region`` and its exact
    box passed for the prompter; returns the questions and ``{id: references}``."""
    wording = get_wording(prompt)
    codec = get_box_codec(wording.box_codec or processor.codec)
    questions, references = [], {}
    for sample in samples:
        if not sample.references:
            continue
        text = wording.referring_question(f"{codec.encode(sample.box)} {processor.region_token}")
        questions.append(Question(sample.id, sample.image, text, (sample.box,)))
        references[sample.id] = sample.references
    return questions, references


def _claim(
    out: Path,
    task: str,
    model: CLOCLlavaForConditionalGeneration,
    processor: CLOCLlavaProcessor,
    settings: GenerationSettings,
    identity: dict[str, Any] | None,
    extra: dict[str, Any],
) -> None:
    """Record what produces the predictions (with the model's dtype and attention implementation); the batch size
    is left out since it does not change them."""
    run = {"task": task, **(identity or {}), "settings": settings.identity(), "box_codec": processor.box_codec}
    claim_output_folder(out, {**run, **extra}, model)


def _write(out: Path, metrics: dict[str, Any], table: str) -> None:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out / "metrics.md").write_text(table + "\n", encoding="utf-8")


def evaluate_rec(
    model: CLOCLlavaForConditionalGeneration,
    processor: CLOCLlavaProcessor,
    samples: Sequence[RefSample],
    out_dir: str | Path,
    *,
    prompt: str = "default",
    expressions: str = "all",
    settings: GenerationSettings | None = None,
    identity: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Ask and score the REC questions of ``samples``; writes ``predictions_rec.jsonl``, ``metrics.json`` and
    ``metrics.md`` under ``out_dir`` and returns the metrics (``None`` on the ranks other than 0 of a data-parallel
    run, :mod:`eval.distributed`). ``identity`` (e.g. ``{"model":``
    :func:`~eval.mllm_generation.model_identity` ``, "data": ...}``) is recorded with the prompt and decoding settings
    so a rerun with another model, data or settings is refused; ``info`` (dataset, split, ...) is copied into the
    metrics."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings or GenerationSettings(max_new_tokens=32)
    extra = {"prompt": get_wording(prompt).grounding, "expressions": expressions}
    _claim(out, "rec", model, processor, settings, identity, extra)
    questions, targets = rec_questions(samples, prompt, expressions)
    store = PredictionStore(out / "predictions_rec.jsonl")
    predictions = answer_questions(model, processor, questions, store, settings, progress=progress)
    if predictions is None:  # not rank 0 of a data-parallel run: rank 0 scores
        return None
    metrics: dict[str, Any] = {"task": "rec", **(info or {}), "prompt": prompt, "expressions": expressions}
    metrics["samples"] = len(samples)
    metrics["rec"] = score_grounding(predictions, without_failed(targets, predictions), processor.codec)
    metrics["rec"]["not_evaluated"] = len(failed_ids(predictions))
    _write(out, metrics, format_rec_metrics(metrics))
    return metrics


def evaluate_reg(
    model: CLOCLlavaForConditionalGeneration,
    processor: CLOCLlavaProcessor,
    samples: Sequence[RefSample],
    out_dir: str | Path,
    *,
    prompt: str = "default",
    settings: GenerationSettings | None = None,
    tokenizer: str = "auto",
    meteor: bool = True,
    identity: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Ask and score the REG questions of ``samples``; writes ``predictions_reg.jsonl``, ``metrics.json`` and
    ``metrics.md`` (returns ``None`` on the ranks other than 0 of a data-parallel run). ``tokenizer``/``meteor``:
    see :func:`eval.caption_metrics.caption_metrics`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings or GenerationSettings(max_new_tokens=48)
    _claim(out, "reg", model, processor, settings, identity, {"prompt": get_wording(prompt).referring})
    questions, references = reg_questions(samples, processor, prompt)
    store = PredictionStore(out / "predictions_reg.jsonl")
    predictions = answer_questions(model, processor, questions, store, settings, progress=progress)
    if predictions is None:
        return None
    answers = {i: p.get("answer") for i, p in predictions.items()}
    metrics: dict[str, Any] = {"task": "reg", **(info or {}), "prompt": prompt, "samples": len(samples)}
    scored = without_failed(references, predictions)
    metrics["reg"] = caption_metrics(answers, scored, tokenizer=tokenizer, meteor=meteor)
    metrics["reg"]["not_evaluated"] = len(failed_ids(predictions))
    _write(out, metrics, format_reg_metrics(metrics))
    return metrics


def _title(metrics: dict[str, Any]) -> str:
    parts = [str(metrics[k]) for k in ("dataset", "split") if metrics.get(k)]
    if metrics.get("format"):
        parts.append(f"({metrics['format']})")
    return " ".join(parts) or "data"


def format_rec_metrics(metrics: dict[str, Any]) -> str:
    """A markdown table of :func:`evaluate_rec`'s metrics."""
    rec = metrics["rec"]
    lines = [
        f"| REC {_title(metrics)}, prompt {metrics['prompt']} | Acc@0.5 | mean IoU | centre acc | questions (no box) |",
        "|---|---:|---:|---:|---:|",
        f"| model | {100 * rec['acc@0.5']:.2f}% | {rec['miou']:.4f} | {100 * rec['center_acc']:.2f}% "
        f"| {rec['num_questions']} ({rec['no_box']}) |",
    ]
    if note := not_evaluated_note(rec.get("not_evaluated", 0)):
        lines += ["", note]
    return "\n".join(lines)


def format_reg_metrics(metrics: dict[str, Any]) -> str:
    """A markdown table of :func:`evaluate_reg`'s metrics (scores ×100 except CIDEr, as papers report them)."""
    reg = metrics["reg"]
    meteor = "n/a" if reg["meteor"] is None else f"{100 * reg['meteor']:.2f}"
    lines = [
        f"| REG {_title(metrics)}, prompt {metrics['prompt']} | BLEU-4 | METEOR | ROUGE-L | CIDEr | questions |",
        "|---|---:|---:|---:|---:|---:|",
        f"| model | {100 * reg['bleu_4']:.2f} | {meteor} | {100 * reg['rouge_l']:.2f} | {100 * reg['cider']:.2f} "
        f"| {reg['num_questions']} |",
        "",
        f"Tokenizer: {reg['tokenizer']}." + (f" {reg['meteor_note']}." if reg.get("meteor_note") else ""),
    ]
    if note := not_evaluated_note(reg.get("not_evaluated", 0)):
        lines.append(note)
    return "\n".join(lines)


__all__ = [
    "REC_PROMPTS",
    "REG_PROMPTS",
    "evaluate_rec",
    "evaluate_reg",
    "format_rec_metrics",
    "format_reg_metrics",
    "rec_question_text",
    "rec_questions",
    "reg_questions",
]
