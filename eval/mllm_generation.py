"""Answer questions about images with a CLOC-LLaVA model: batched greedy generation, predictions appended to a JSONL
file keyed by question id, resumed after an interruption without recomputing or duplicating.

A :class:`Question` is one user turn about one image; regions in it are written ``[x1, y1, x2, y2] <region>`` (the
processor's :meth:`~mllm.CLOCLlavaProcessor.format_region`), with ``boxes`` the exact normalised original-frame
boxes of its ``<region>`` tokens. The prompt is rendered by the processor's chat template exactly as in training
(:meth:`train.mllm_conversations.ConversationRecord.messages`): ``[{"type": "image"}, {"type": "text", ...}]`` in
the user turn, then the generation prompt.

Batches are left-padded; greedy outputs do not depend on the batch size (``tests/test_mllm_model.py`` checks
batch-of-n against batch-of-one). An unreadable image gives a prediction with ``answer: null`` and an ``error``,
counted, never a crash; resuming skips every id already in the file.

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

from eval.distributed import barrier, data_parallel_rank
from eval.predictions import PredictionStore, answered_ids, merge_shards, shard_path
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor

IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


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


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings of an evaluation (greedy by default, as every benchmark here reports)."""

    max_new_tokens: int = 64
    batch_size: int = 16
    system_prompt: str | None = None


RUN_FILE = "eval_run.json"


def claim_output_folder(out_dir: str | os.PathLike[str], identity: dict[str, Any]) -> None:
    """Record what produces the predictions in ``out_dir`` (model, data, decoding settings) in ``eval_run.json``;
    raise ``ValueError`` when the folder already holds predictions of a different run, so a resume never mixes
    the answers of two models or two settings. Data-parallel: rank 0 writes the record, then every rank compares
    (all raise the same error, none waits forever)."""
    path = Path(out_dir) / RUN_FILE
    identity = json.loads(json.dumps(identity))  # plain JSON types, as read back
    rank, _ = data_parallel_rank()
    if rank == 0 and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")
    barrier()
    if not path.exists():
        raise ValueError(f"{path}: written by rank 0 but not seen by rank {rank}; --out must be on a shared filesystem")
    recorded = json.loads(path.read_text(encoding="utf-8"))
    if recorded != identity:
        changed = sorted(k for k in {*recorded, *identity} if recorded.get(k) != identity.get(k))
        raise ValueError(
            f"{out_dir} holds predictions of another run (differs in {', '.join(changed)}); "
            "choose a new --out, or delete the folder to start over"
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


def _generate(
    model: CLOCLlavaForConditionalGeneration,
    processor: CLOCLlavaProcessor,
    todo: Sequence[Question],
    store: PredictionStore,
    settings: GenerationSettings,
    bar: tqdm,
) -> None:
    """Answer ``todo`` in batches, appending each batch's predictions to ``store``."""
    for start in range(0, len(todo), settings.batch_size):
        batch = todo[start : start + settings.batch_size]
        results: list[dict[str, Any]] = []
        readable, images = [], []
        for question in batch:
            try:
                images.append(_open_image(question.image))
                readable.append(question)
            except IMAGE_ERRORS as error:
                results.append({**prediction_record(question, None), "error": f"{question.image}: {error}"})
        if readable:
            answers = _answer_batch(model, processor, readable, images, settings)
            results.extend(prediction_record(q, a) for q, a in zip(readable, answers, strict=True))
        store.append(results)
        bar.update(len(batch))
    bar.close()


def answer_questions(
    model: CLOCLlavaForConditionalGeneration,
    processor: CLOCLlavaProcessor,
    questions: Sequence[Question],
    store: PredictionStore,
    settings: GenerationSettings | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]] | None:
    """Generate an answer for every question not yet in ``store`` and append it there; returns every prediction of
    ``questions`` (:func:`prediction_record`; ``answer`` is ``None`` with an ``error`` for unreadable
    images). Questions keep their given order; ids must be unique.

    In a data-parallel run every rank calls this with the same questions: rank ``r`` of ``w`` answers
    ``todo[r::w]`` (``todo``: the questions in neither ``store`` nor a shard beside it) into its shard; after a
    barrier rank 0 merges the shards into ``store`` and returns the predictions, the other ranks return ``None``.
    Answers left in shards by an interrupted run of any world size, or by one process, are reused."""
    settings = settings or GenerationSettings()
    if settings.batch_size < 1 or settings.max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be positive")
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
        _generate(model, processor, todo, store, settings, bar)
        return {q.id: store.predictions[q.id] for q in questions}
    answered = answered_ids(store)
    mine = [q for q in questions if q.id not in answered][rank::world_size]
    shard = PredictionStore(shard_path(store.path, rank, world_size))
    barrier()  # every rank has read the files before any rank appends to its shard
    bar = tqdm(total=len(mine), desc=f"generate (rank 0 of {world_size})", disable=rank != 0 or not progress)
    _generate(model, processor, mine, shard, settings, bar)
    barrier()  # every shard is complete
    if rank != 0:
        return None
    merge_shards(store, ids)
    return {q.id: store.predictions[q.id] for q in questions}


__all__ = [
    "RUN_FILE",
    "GenerationSettings",
    "PredictionStore",
    "Question",
    "answer_questions",
    "claim_output_folder",
    "model_identity",
    "prediction_record",
    "prompt_text",
]
