"""Saving and resuming a CLOC pretraining job (the collective skeleton is :mod:`train.trainer_state`'s).

A CLOC checkpoint is a complete encoder: ``CLOCModel.save_pretrained`` files, the tokenizer and the image
processor, loadable on their own, plus what resuming needs (see :mod:`train.checkpoint`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.checkpoint import load_model_weights, read_json, write_json
from train.cloc.streaming import StreamingBatches
from train.runtime import checkpoint_state_dict
from train.trainer_state import Run, TrainerState, load_run_checkpoint, save_run_checkpoint

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class CLOCRun(Run):
    """A :class:`~train.trainer_state.Run` whose ``model`` is the bare :class:`~cloc_encoder.CLOCModel`;
    ``scalar_shapes`` are the scalar parameters promoted to 1-element tensors for DeepSpeed."""

    scalar_shapes: dict[str, Any] = field(default_factory=dict)
    stream: StreamingBatches | None = None
    """Set when training streams tar shards: its per-rank position is saved as ``data_state_rank<r>.json``."""


def data_state_file(folder: Path, rank: int) -> Path:
    return folder / f"data_state_rank{rank}.json"


def save_checkpoint(run: CLOCRun, state: TrainerState) -> Path:
    """Write ``step-NNNNNN`` atomically (collective: every rank must call it at the same step)."""

    def write_files(folder: Path) -> None:
        if run.stream is not None:
            write_json(data_state_file(folder, run.context.rank), run.stream.state_dict())
        if run.context.is_main:
            run.model.save_pretrained(folder, state_dict=checkpoint_state_dict(run.model, run.scalar_shapes))
            run.tokenizer.save_pretrained(folder)
            run.processor.save_pretrained(folder)

    return save_run_checkpoint(run, state, write_files)


def load_checkpoint(run: CLOCRun, folder: Path) -> TrainerState:
    """Restore model, optimizer, scheduler and progress from ``folder`` (RNG: :meth:`CLOCRun.restore_rng`)."""
    saved = load_run_checkpoint(run, folder, lambda path: load_model_weights(run.model, path))
    if run.stream is not None:
        path = data_state_file(folder, run.context.rank)
        if path.exists():
            run.stream.load_state_dict(read_json(path))
        else:
            logger.warning("%s has no %s: the resumed epoch reads all its shards again", folder, path.name)
    return TrainerState.from_json(saved)
