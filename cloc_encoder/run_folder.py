"""Reading a training run's output folder: its complete ``step-NNNNNN`` checkpoints and the latest one.

A run (CLOC pretraining or an MLLM stage) writes ``output_dir/step-NNNNNN/`` checkpoints, each complete once its
``trainer_state.json`` is in place, and a ``latest`` text file naming the newest (layout:
:mod:`train.checkpoint`, which owns the writing). Evaluation, serving and training all accept such a folder
wherever a saved model is expected; this module is the read-only half they share, so none of them imports
:mod:`train` to find a model.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

LATEST = "latest"
"""The text file in ``output_dir`` naming the newest complete checkpoint (``"step-000300"``)."""
TRAINER_STATE = "trainer_state.json"
"""Written last into a checkpoint: a ``step-NNNNNN`` folder without it is incomplete."""
STEP_PATTERN = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    """The checkpoint folder name of optimizer step ``step``: ``step-000300``."""
    return f"step-{step:06d}"


def is_complete_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is a finished ``step-NNNNNN`` checkpoint (its ``trainer_state.json`` is written)."""
    return folder.is_dir() and STEP_PATTERN.match(folder.name) is not None and (folder / TRAINER_STATE).is_file()


def complete_checkpoints(output_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the complete checkpoints under ``output_dir``, oldest first (none: an empty list)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for folder in output_dir.iterdir():
        match = STEP_PATTERN.match(folder.name)
        if match and is_complete_checkpoint(folder):
            found.append((int(match.group(1)), folder))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint ``latest`` names, or the newest complete one when the pointer is missing or broken; None when
    ``output_dir`` holds no complete checkpoint."""
    output_dir = Path(output_dir)
    pointer = output_dir / LATEST
    if pointer.is_file():
        folder = output_dir / pointer.read_text(encoding="utf-8").strip()
        if is_complete_checkpoint(folder):
            return folder
        logger.warning("%s names %s, which is not a complete checkpoint; using the newest one", pointer, folder)
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_model_folder(path: str | os.PathLike[str]) -> Path:
    """A model folder from ``path``: ``path`` itself when it holds a ``config.json``, else — a training run's
    ``output_dir`` — its latest complete checkpoint; ``path`` unchanged when it is neither (loading then reports)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path)
    return latest if latest is not None else path


__all__ = [
    "LATEST",
    "STEP_PATTERN",
    "TRAINER_STATE",
    "complete_checkpoints",
    "is_complete_checkpoint",
    "latest_checkpoint",
    "resolve_model_folder",
    "step_dir_name",
]
