"""Atomic, pickle-free training checkpoints.

Layout of ``output_dir``::

    latest                      # text file naming the newest complete checkpoint ("step-000300"), replaced atomically
    step-000300/                # one complete checkpoint (appears only by os.replace of step-000300.tmp)
        config.json, model.safetensors           # CLOCModel.save_pretrained: usable on its own
        tokenizer files, preprocessor_config.json
        optimizer.json + optimizer.safetensors   # optimizer state: tensors in safetensors, the rest in JSON
        scheduler.json
        rng_state_rank0.json ...                 # python / numpy / torch RNG states of every rank
        train_config.yaml
        trainer_state.json                       # written last: step, epoch, position, log history
        deepspeed/                               # only under DeepSpeed: the engine's own checkpoint

A checkpoint is written into ``step-NNNNNN.tmp`` and renamed when complete, so a crash never leaves a directory
that looks finished; leftover ``.tmp`` directories are ignored and removed. Reading a run folder (its complete
checkpoints, the latest one, :func:`~cloc_encoder.run_folder.resolve_model_folder`) is
:mod:`cloc_encoder.run_folder`'s, shared with evaluation and serving; this module owns the writing.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cloc_encoder.data.format import atomic_write_text
from cloc_encoder.run_folder import (
    LATEST,
    TRAINER_STATE,
    complete_checkpoints,
    is_complete_checkpoint,
    latest_checkpoint,
    step_dir_name,
)

logger = logging.getLogger(__name__)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ----- pickle-free state trees: tensors → safetensors, everything else → JSON ---------------------------------------


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, torch.Tensor):
        key = path or "value"
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in value.items()}
        return {
            "__items__": [
                [_encode(k, tensors, f"{path}.k{i}"), _encode(v, tensors, f"{path}.{i}")]
                for i, (k, v) in enumerate(value.items())
            ]
        }
    raise TypeError(f"cannot store {type(value).__name__} at {path or 'top level'} without pickle")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return np.asarray(value["__ndarray__"], dtype=value["dtype"])
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_state(folder: str | os.PathLike[str], name: str, state: Any) -> None:
    """Store a nested state (dicts, lists, tuples, numbers, strings, tensors, numpy arrays) as ``name.json`` plus
    ``name.safetensors`` for its tensors. Raises :class:`TypeError` for anything else (no pickle)."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, "")
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
    write_json(folder / f"{name}.json", {"format": 1, "state": tree})


def load_state(folder: str | os.PathLike[str], name: str) -> Any:
    """Inverse of :func:`save_state`."""
    folder = Path(folder)
    tensor_file = folder / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    return _decode(read_json(folder / f"{name}.json")["state"], tensors)


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) random states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_model_weights(model: nn.Module, folder: str | os.PathLike[str]) -> None:
    """Load ``model.safetensors`` (or its sharded index) from a ``save_pretrained`` folder, strictly."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(folder / file)))
    model.load_state_dict(state, strict=True)


# ----- the checkpoint folder ---------------------------------------------------------------------------------------


class CheckpointManager:
    """Names, commits, finds and prunes ``step-NNNNNN`` checkpoints under ``output_dir``."""

    def __init__(self, output_dir: str | os.PathLike[str], keep_last: int = 3) -> None:
        self.output_dir = Path(output_dir)
        self.keep_last = keep_last

    def path(self, step: int) -> Path:
        return self.output_dir / step_dir_name(step)

    def tmp_path(self, step: int) -> Path:
        return self.output_dir / f"{step_dir_name(step)}.tmp"

    def begin(self, step: int) -> Path:
        """A fresh, empty ``step-NNNNNN.tmp`` folder to write a checkpoint into."""
        tmp = self.tmp_path(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int) -> Path:
        """Rename the finished ``.tmp`` folder into place, point ``latest`` at it and prune old checkpoints."""
        tmp, final = self.tmp_path(step), self.path(step)
        if not (tmp / TRAINER_STATE).is_file():
            raise RuntimeError(f"{tmp}: incomplete checkpoint (no {TRAINER_STATE}); not committing it")
        if final.exists():  # the same step saved again (e.g. a final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(self.output_dir / LATEST, final.name + "\n")
        self.prune()
        return final

    is_complete = staticmethod(is_complete_checkpoint)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.output_dir)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, or the newest complete one when the pointer is missing or broken."""
        return latest_checkpoint(self.output_dir)

    def prune(self) -> None:
        """Keep the newest ``keep_last`` checkpoints."""
        for _, folder in self.checkpoints()[: -self.keep_last]:
            shutil.rmtree(folder, ignore_errors=True)

    def remove_stale_tmp(self) -> None:
        """Delete leftover ``*.tmp`` checkpoint folders of an interrupted save."""
        if self.output_dir.is_dir():
            for folder in self.output_dir.glob("step-*.tmp"):
                if folder.is_dir():
                    logger.warning("removing incomplete checkpoint %s", folder)
                    shutil.rmtree(folder, ignore_errors=True)


__all__ = [
    "LATEST",
    "TRAINER_STATE",
    "CheckpointManager",
    "atomic_write_text",
    "capture_rng_state",
    "load_model_weights",
    "load_state",
    "read_json",
    "restore_rng_state",
    "save_state",
    "step_dir_name",
    "write_json",
]
