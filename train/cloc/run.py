"""Saving and resuming a CLOC pretraining job (the collective skeleton is :mod:`train.trainer_state`'s).

A CLOC checkpoint is a complete encoder: ``CLOCModel.save_pretrained`` files, the tokenizer and the image
processor, loadable on their own, plus what resuming needs (see :mod:`train.checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.checkpoint import load_model_weights
from train.runtime import checkpoint_state_dict
from train.trainer_state import Run, TrainerState, load_run_checkpoint, save_run_checkpoint


@dataclass(kw_only=True)
class CLOCRun(Run):
    """A :class:`~train.trainer_state.Run` whose ``model`` is the bare :class:`~cloc_encoder.CLOCModel`;
    ``scalar_shapes`` are the scalar parameters promoted to 1-element tensors for DeepSpeed."""

    scalar_shapes: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(run: CLOCRun, state: TrainerState) -> Path:
    """Write ``step-NNNNNN`` atomically (collective: every rank must call it at the same step)."""

    def write_files(folder: Path) -> None:
        if run.context.is_main:
            run.model.save_pretrained(folder, state_dict=checkpoint_state_dict(run.model, run.scalar_shapes))
            run.tokenizer.save_pretrained(folder)
            run.processor.save_pretrained(folder)

    return save_run_checkpoint(run, state, write_files)


def load_checkpoint(run: CLOCRun, folder: Path) -> TrainerState:
    """Restore model, optimizer, scheduler and progress from ``folder`` (RNG: :meth:`CLOCRun.restore_rng`)."""
    saved = load_run_checkpoint(run, folder, lambda path: load_model_weights(run.model, path))
    return TrainerState.from_json(saved)
