"""Answer questions about images with a CLOC-LLaVA model: batched greedy generation, predictions appended to a JSONL
file keyed by question id, resumed after an interruption without recomputing or duplicating.

A :class:`Question` is one user turn about one image; regions in it are written ``[x1, y1, x2, y2] <region>`` (the
processor's :meth:`~mllm.CLOCLlavaProcessor.format_region`), with ``boxes`` the exact normalised original-frame
boxes of its ``<region>`` tokens. The prompt is rendered by the processor's chat template exactly as in training
(:meth:`train.mllm.conversations.ConversationRecord.messages`): ``[{"type": "image"}, {"type": "text", ...}]`` in
the user turn, then the generation prompt.

Batches are left-padded; in float32 greedy outputs do not depend on the batch size (``tests/test_mllm_model.py``
checks batch-of-n against batch-of-one; in bfloat16 a few answers may, ``docs/evaluation.md``). An unreadable image
(or another failure outside the model) gives a *failed* prediction: ``answer: null``, ``"status": "failed"`` and an
``error`` (:mod:`eval.predictions`), never a crash; it is not scored, it is counted, and a rerun asks it again.
More failures than :attr:`GenerationSettings.max_failed_fraction` of the questions stop the run
(:class:`TooManyFailuresError`). Resuming skips every id already answered in the file.

What produced a folder's predictions (model, dtype, attention implementation, data, decoding settings) is recorded
in its ``eval_run.json`` (:func:`claim_output_folder`); a rerun that differs is refused rather than mixed in.

Data-parallel (``torchrun``/``accelerate launch``, :mod:`eval.distributed`): each rank answers every
``world_size``-th question still unanswered into its own shard file, then rank 0 merges the shards into the store
(:mod:`eval.predictions`) and alone gets the predictions back to score; the other ranks get ``None``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from cloc_encoder.data.format import atomic_write_text
from cloc_encoder.data.images import IMAGE_ERRORS
from eval.distributed import barrier, data_parallel_rank
from eval.predictions import FAILED, PredictionStore, answered_ids, failed_ids, merge_shards, shard_path
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor


@dataclass(frozen=True)
class Question:
    """One question about one image. ``boxes``: normalised original-frame ``xyxy`` per ``<region>`` (``None``: read
    each from the box text before its ``<region>``). ``target_box``: the box a grounding answer is scored against
    (same frame), recorded with the prediction so it can be plotted without the dataset."""

    id: str
    image: Path
    text: str
    boxes: tuple[tuple[float, float, float, float], ...] | None = None
    target_box: tuple[float, float, float, float] | None = None


DEFAULT_MAX_FAILED_FRACTION = 0.01


@dataclass(frozen=True)
class GenerationSettings:
    """Settings of an evaluation: decoding (greedy, as every benchmark here reports), the batch size, and how many
    failed answers (:mod:`eval.predictions`) stop the run: more than ``max_failed_fraction`` of the questions."""

    max_new_tokens: int = 64
    batch_size: int = 16
    system_prompt: str | None = None
    max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION

    def identity(self) -> dict[str, Any]:
        """The settings that change the predictions, recorded in ``eval_run.json``: not the batch size (greedy
        answers do not depend on it) nor the failure bound."""
        return {"max_new_tokens": self.max_new_tokens, "system_prompt": self.system_prompt}


class TooManyFailuresError(RuntimeError):
    """More answers failed outside the model (unreadable images, I/O errors) than the run allows."""


RUN_FILE = "eval_run.json"
_NOT_RECORDED = object()


def runtime_identity(model: torch.nn.Module) -> dict[str, str]:
    """What of the loaded model, besides its weights, changes the answers: ``dtype`` (``"bfloat16"``, ...) and the
    ``attn_implementation`` it runs (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``)."""
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None) if config is not None else None
    return {"dtype": str(dtype).removeprefix("torch."), "attn_implementation": str(attention)}


def _shown(value: Any) -> str:
    if value is _NOT_RECORDED:
        return "not recorded"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _differences(recorded: dict[str, Any], requested: dict[str, Any], prefix: str = "") -> list[str]:
    """``"key: <recorded> in eval_run.json, <requested> now"`` for every differing leaf (nested keys dotted)."""
    found = []
    for key in sorted({*recorded, *requested}):
        old, new = recorded.get(key, _NOT_RECORDED), requested.get(key, _NOT_RECORDED)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            found += _differences(old, new, f"{prefix}{key}.")
        else:
            found.append(f"{prefix}{key}: {_shown(old)} in {RUN_FILE}, {_shown(new)} now")
    return found


def claim_output_folder(out_dir: str | os.PathLike[str], identity: dict[str, Any], model: torch.nn.Module) -> None:
    """Record what produces the predictions in ``out_dir`` in ``eval_run.json`` (written atomically): ``identity``
    (model, data, decoding settings, ...) and ``model``'s dtype and attention implementation
    (:func:`runtime_identity`). Raise ``ValueError`` when the folder already holds predictions of a different run,
    naming each differing value as recorded and as now, so a resume never mixes the answers of two models, two
    dtypes or two settings. Data-parallel: rank 0 writes the record, then every rank compares (all raise the same
    error, none waits forever)."""
    path = Path(out_dir) / RUN_FILE
    identity = json.loads(json.dumps({**identity, **runtime_identity(model)}))  # plain JSON types, as read back
    rank, _ = data_parallel_rank()
    if rank == 0 and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(identity, indent=2) + "\n")
    barrier()
    if not path.exists():
        raise ValueError(f"{path}: written by rank 0 but not seen by rank {rank}; --out must be on a shared filesystem")
    recorded = json.loads(path.read_text(encoding="utf-8"))
    if recorded != identity:
        changed = sorted(k for k in {*recorded, *identity} if recorded.get(k) != identity.get(k))
        raise ValueError(
            f"{out_dir} holds predictions of another run (differs in {', '.join(changed)}: "
            f"{'; '.join(_differences(recorded, identity))}); choose a new --out, or delete the folder to start over"
        )


def model_identity(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """A cheap fingerprint of a saved model folder: its resolved path and the size and modification time of each
    weight file (a retrained model in the same folder gets a new fingerprint)."""
    folder = Path(folder).resolve()
    weights = sorted(folder.glob("*.safetensors"))
    return {
        "path": str(folder),
        "weights": {w.name: [w.stat().st_size, w.stat().st_mtime_ns] for w in weights},
    }


def prompt_text(processor: CLOCLlavaProcessor, question: str, system_prompt: str | None = None) -> str:
    """The chat-template prompt of one user turn with the image first, ending with the generation prompt."""
    messages: list[dict[str, Any]] = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prediction_record(question: Question, answer: str | None) -> dict[str, Any]:
    """The stored prediction of ``question``: ``id``, ``answer``, ``question``, ``image`` and, for grounding,
    ``target_box`` (normalised original-frame ``xyxy``). Files written before ``image``/``target_box`` existed
    still read and score (only ``id`` and ``answer`` are needed)."""
    record: dict[str, Any] = {"id": question.id, "answer": answer, "question": question.text}
    record["image"] = str(question.image)
    if question.target_box is not None:
        record["target_box"] = [float(v) for v in question.target_box]
    return record


def _open_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


@torch.inference_mode()
def _answer_batch(
    model: CLOCLlavaForConditionalGeneration,
    processor: CLOCLlavaProcessor,
    questions: Sequence[Question],
    images: Sequence[Image.Image],
    settings: GenerationSettings,
) -> list[str]:
    prompts = [prompt_text(processor, q.text, settings.system_prompt) for q in questions]
    boxes = [None if q.boxes is None else [list(b) for b in q.boxes] for q in questions]
    inputs = processor(images=list(images), text=prompts, boxes=boxes, padding=True, padding_side="left")
    parameter = next(model.parameters())
    inputs = {key: value.to(parameter.device) for key, value in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(parameter.dtype)
    tokenizer = processor.tokenizer
    output = model.generate(
        **inputs,
        do_sample=False,
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def failed_record(question: Question, error: str) -> dict[str, Any]:
    """The stored prediction of a question whose answer failed outside the model: ``answer: null``,
    ``"status": "failed"`` and the ``error`` (retried on the next run, :mod:`eval.predictions`)."""
    return {**prediction_record(question, None), "status": FAILED, "error": error}


def check_failures(
    predictions: dict[str, dict[str, Any]], num_questions: int, settings: GenerationSettings, where: Path
) -> None:
    """Raise :class:`TooManyFailuresError` when more of ``predictions`` failed than ``settings`` allows of
    ``num_questions`` questions."""
    failed = sorted(failed_ids(predictions))
    limit = int(settings.max_failed_fraction * num_questions + 1e-9)  # 0.1 × 30 is 3, not 2.9999…
    if len(failed) > limit:
        example = predictions[failed[0]].get("error")
        raise TooManyFailuresError(
            f"{len(failed)} of {num_questions} questions could not be answered (their image could not be read; "
            f"e.g. {failed[0]}: {example}), more than --max-failed-fraction {settings.max_failed_fraction:g} allows "
            f"({limit}). They are recorded as failed in {where} and asked again on the next run: fix the images "
            "(or raise --max-failed-fraction) and rerun"
        )


def not_evaluated_note(count: int) -> str:
    """The sentence a metrics table ends with when ``count`` questions were not evaluated (else ``""``)."""
    if not count:
        return ""
    return f"Not evaluated: {count} questions (image could not be read; asked again on the next run)."


def _generate(
    model: CLOCLlavaForConditionalGeneration,
    processor: CLOCLlavaProcessor,
    todo: Sequence[Question],
    store: PredictionStore,
    settings: GenerationSettings,
    bar: tqdm,
    num_questions: int,
) -> None:
    """Answer ``todo`` in batches, appending each batch's predictions to ``store``; stop with
    :class:`TooManyFailuresError` as soon as more answers failed than ``settings`` allows of ``num_questions``."""
    failed: dict[str, dict[str, Any]] = {}
    try:
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start : start + settings.batch_size]
            results: list[dict[str, Any]] = []
            readable, images = [], []
            for question in batch:
                try:
                    images.append(_open_image(question.image))
                    readable.append(question)
                except IMAGE_ERRORS as error:
                    results.append(failed_record(question, f"{question.image}: {error}"))
                    failed[question.id] = results[-1]
            if readable:
                answers = _answer_batch(model, processor, readable, images, settings)
                results.extend(prediction_record(q, a) for q, a in zip(readable, answers, strict=True))
            store.append(results)
            bar.update(len(batch))
            check_failures(failed, num_questions, settings, store.path)
    finally:
        bar.close()


def answer_questions(
    model: CLOCLlavaForConditionalGeneration,
    processor: CLOCLlavaProcessor,
    questions: Sequence[Question],
    store: PredictionStore,
    settings: GenerationSettings | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]] | None:
    """Generate an answer for every question not yet answered in ``store`` (a failed prediction is asked again) and
    append it there; returns every prediction of ``questions`` (:func:`prediction_record`; :func:`failed_record`
    for unreadable images). Questions keep their given order; ids must be unique. Raises
    :class:`TooManyFailuresError` (after storing what was answered) when more than ``settings.max_failed_fraction``
    of the questions failed.

    In a data-parallel run every rank calls this with the same questions: rank ``r`` of ``w`` answers
    ``todo[r::w]`` (``todo``: the questions answered in neither ``store`` nor a shard beside it) into its shard;
    after a barrier rank 0 merges the shards into ``store``, checks the failures of all ranks and returns the
    predictions, the other ranks return ``None`` (a rank whose own failures pass the bound stops at once). Answers
    left in shards by an interrupted run of any world size, or by one process, are reused."""
    settings = settings or GenerationSettings()
    if settings.batch_size < 1 or settings.max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be positive")
    if not 0.0 <= settings.max_failed_fraction <= 1.0:
        raise ValueError(f"max_failed_fraction={settings.max_failed_fraction}; expected a fraction in [0, 1]")
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"question ids must be unique; {duplicate!r} appears more than once")
    model.eval()
    rank, world_size = data_parallel_rank()
    if world_size == 1:
        merge_shards(store, ids)  # answers of an interrupted data-parallel run
        todo = [q for q in questions if q.id not in store]
        bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc="generate", disable=not progress)
        _generate(model, processor, todo, store, settings, bar, len(questions))
        predictions = {q.id: store.predictions[q.id] for q in questions}
        check_failures(predictions, len(questions), settings, store.path)
        return predictions
    answered = answered_ids(store)
    mine = [q for q in questions if q.id not in answered][rank::world_size]
    shard = PredictionStore(shard_path(store.path, rank, world_size))
    barrier()  # every rank has read the files before any rank appends to its shard
    bar = tqdm(total=len(mine), desc=f"generate (rank 0 of {world_size})", disable=rank != 0 or not progress)
    _generate(model, processor, mine, shard, settings, bar, len(questions))
    barrier()  # every shard is complete
    if rank != 0:
        return None
    merge_shards(store, ids)
    predictions = {q.id: store.predictions[q.id] for q in questions}
    check_failures(predictions, len(questions), settings, store.path)
    return predictions


__all__ = [
    "DEFAULT_MAX_FAILED_FRACTION",
    "RUN_FILE",
    "GenerationSettings",
    "PredictionStore",
    "Question",
    "TooManyFailuresError",
    "answer_questions",
    "check_failures",
    "claim_output_folder",
    "failed_record",
    "model_identity",
    "not_evaluated_note",
    "prediction_record",
    "prompt_text",
    "runtime_identity",
]
