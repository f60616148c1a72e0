"""Prediction files of an evaluation: an append-only JSONL store keyed by question id, and the per-rank shards a
data-parallel run writes beside it.

A data-parallel run (``torchrun``/``accelerate launch``, :mod:`eval.distributed`) has each rank append its answers to
``<stem>.rank<r>-of-<w>.jsonl`` next to the canonical ``<stem>.jsonl``; rank 0 then merges every shard into the
canonical file (:func:`merge_shards`) and deletes them. Shards of any world size left by an interrupted run count as
answered on the next run, whatever its world size.

A question whose answer failed for a reason outside the model (an unreadable or corrupt image, an I/O error) is stored
as a *failed* prediction (``"status": "failed"`` with an ``error``, :func:`is_failed`): it counts, and is reported, as
not evaluated, and it is asked again on the next run, whose line then replaces it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

FAILED = "failed"
"""The ``status`` of a prediction whose answer failed outside the model (retried on the next run)."""

T = TypeVar("T")


def is_failed(prediction: Mapping[str, Any]) -> bool:
    """Whether ``prediction`` records a failure outside the model, to be retried: ``"status": "failed"``, or, in
    files written before the status existed, ``"answer": null`` with an ``error``."""
    return prediction.get("status") == FAILED or (prediction.get("answer") is None and bool(prediction.get("error")))


def failed_ids(predictions: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """The ids of the failed predictions (:func:`is_failed`) in ``predictions``."""
    return {question_id for question_id, prediction in predictions.items() if is_failed(prediction)}


def without_failed(items: Mapping[str, T], predictions: Mapping[str, Mapping[str, Any]]) -> dict[str, T]:
    """``items`` (e.g. the scoring targets, by question id) less those whose prediction failed: what is scored."""
    failed = failed_ids(predictions)
    return {question_id: item for question_id, item in items.items() if question_id not in failed}


class PredictionStore:
    """An append-only JSONL file of predictions ``{"id", "answer", ...}``; the first line for an id wins, except
    over a failed prediction (:func:`is_failed`), which any later line for its id replaces.

    ``question_id in store`` is true when the id has a prediction that did not fail (a failed one is asked again);
    :attr:`predictions` holds the failed ones too. A partly written last line (a killed process) is ignored on
    reading and overwritten by the next append.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.predictions: dict[str, dict[str, Any]] = {}
        self._valid_bytes = 0
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        offset = 0
        for number, line in enumerate(self.path.read_bytes().splitlines(keepends=True), start=1):
            if not line.endswith(b"\n"):
                break  # an interrupted append
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{self.path}:{number}: not JSON ({error.msg}); fix or delete the line") from error
            if not isinstance(item, dict) or "id" not in item:
                raise ValueError(f"{self.path}:{number}: a prediction must be a JSON object with an 'id'")
            offset += len(line)
            self._keep(item)
        self._valid_bytes = offset

    def _keep(self, item: dict[str, Any]) -> None:
        """Record ``item`` unless its id already has a prediction that did not fail."""
        question_id = str(item["id"])
        if question_id not in self:
            self.predictions[question_id] = item

    def __contains__(self, question_id: str) -> bool:
        prediction = self.predictions.get(question_id)
        return prediction is not None and not is_failed(prediction)

    def __len__(self) -> int:
        return len(self.predictions)

    def append(self, items: Sequence[dict[str, Any]]) -> None:
        """Append predictions and flush them to disk (``fsync``) before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "r+b" if self.path.exists() else "wb") as handle:
            handle.truncate(self._valid_bytes)
            handle.seek(self._valid_bytes)
            for item in items:
                handle.write((json.dumps(item, ensure_ascii=False) + "\n").encode("utf-8"))
                self._keep(item)
            handle.flush()
            os.fsync(handle.fileno())
            self._valid_bytes = handle.tell()


def shard_path(path: str | os.PathLike[str], rank: int, world_size: int) -> Path:
    """The shard of rank ``rank`` of ``world_size`` beside the canonical ``path``:
    ``predictions_rec.jsonl`` → ``predictions_rec.rank0-of-8.jsonl``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}-of-{world_size}{path.suffix}")


def shard_paths(path: str | os.PathLike[str]) -> list[Path]:
    """Every shard file beside the canonical ``path``, of any world size, ordered by world size and rank."""
    path = Path(path)
    pattern = re.compile(rf"{re.escape(path.stem)}\.rank(\d+)-of-(\d+){re.escape(path.suffix)}")
    found = []
    for candidate in path.parent.glob(f"{path.stem}.rank*-of-*{path.suffix}"):
        if match := pattern.fullmatch(candidate.name):
            found.append(((int(match[2]), int(match[1])), candidate))
    return [candidate for _, candidate in sorted(found)]


def answered_ids(store: PredictionStore) -> set[str]:
    """The ids answered in ``store`` or in any shard beside it (a failed prediction is not an answer)."""
    answered = {question_id for question_id in store.predictions if question_id in store}
    for path in shard_paths(store.path):
        shard = PredictionStore(path)
        answered.update(question_id for question_id in shard.predictions if question_id in shard)
    return answered


def merge_shards(store: PredictionStore, order: Iterable[str] = ()) -> int:
    """Append to ``store`` every prediction of the shards beside it whose id it has not answered (a failed
    prediction in ``store`` is replaced; an answer wins over a failure, else the first line of an id; ids in
    ``order`` first, in that order, then the others as found), then delete the shards; returns how many were added.
    The shards are deleted only once the canonical file is flushed, so an interrupted merge is redone."""
    shards = [PredictionStore(path) for path in shard_paths(store.path)]
    found: dict[str, dict[str, Any]] = {}
    for shard in shards:
        for question_id, item in shard.predictions.items():
            if question_id not in store and (question_id not in found or is_failed(found[question_id])):
                found[question_id] = item
    position = {question_id: index for index, question_id in enumerate(order)}
    items = sorted(found.values(), key=lambda item: position.get(str(item["id"]), len(position)))
    if items:
        store.append(items)
    for shard in shards:
        shard.path.unlink()
    return len(items)


__all__ = [
    "FAILED",
    "PredictionStore",
    "answered_ids",
    "failed_ids",
    "is_failed",
    "merge_shards",
    "shard_path",
    "shard_paths",
    "without_failed",
]
