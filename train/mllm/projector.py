"""The stage-1 projector file, ``mm_projector.safetensors``: both projectors' weights (image and region) with the
base they were aligned to, as LLaVA's ``pretrain_mm_mlp_adapter``; stage 2 starts from it.

Vision-tower parts the run trained (``tune_prompter``: the prompter; ``tune_vision_tower``: the ViT) travel with
the projectors in the same file, under their full-model names (``model.vision_tower.*``; the parts are listed in
the metadata, ``vision_tower_parts``): stage 2 rebuilds its tower from ``vision_tower`` and loads them on top."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from train.config import ConfigError
from train.mllm.trainable import unwrap
from train.mllm.zero3 import full_shape, gathered

logger = logging.getLogger(__name__)
MM_PROJECTOR_FILE = "mm_projector.safetensors"
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "model.region_projector.")
TOWER_PREFIX = "model.vision_tower."
FILE_PREFIXES = (*PROJECTOR_PREFIXES, TOWER_PREFIX)
"""Names the file may hold: both projectors and trained vision-tower parameters."""


def projector_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Both projectors' weights under their names in the full model (``model.multi_modal_projector.*``, ...).
    Under ZeRO-3 these are this rank's empty placeholders: see :func:`projector_parameters`."""
    inner = unwrap(model)
    state = {}
    for prefix, module in (
        (PROJECTOR_PREFIXES[0], inner.model.multi_modal_projector),
        (PROJECTOR_PREFIXES[1], inner.model.region_projector),
    ):
        for name, tensor in module.state_dict().items():
            state[prefix + name] = tensor
    return state


def projector_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Both projectors' parameters by their names in the full model (partitioned ones included)."""
    inner = unwrap(model)
    return {
        prefix + name: parameter
        for prefix, module in (
            (PROJECTOR_PREFIXES[0], inner.model.multi_modal_projector),
            (PROJECTOR_PREFIXES[1], inner.model.region_projector),
        )
        for name, parameter in module.named_parameters()
    }


def tower_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The vision tower's parameters (ViT + prompter) by their names in the full model (partitioned ones included)."""
    tower = unwrap(model).model.vision_tower
    return {TOWER_PREFIX + name: parameter for name, parameter in tower.named_parameters()}


def tower_parts(keys: Iterable[str]) -> list[str]:
    """The vision-tower parts (``prompter``, ``vision_model``) that full-model names ``keys`` belong to."""
    return sorted({key[len(TOWER_PREFIX) :].split(".", 1)[0] for key in keys if key.startswith(TOWER_PREFIX)})


def save_projector(state: dict[str, torch.Tensor], path: Path, source: dict[str, Any] | None = None) -> None:
    """Write ``mm_projector.safetensors`` (projector weights plus any trained vision-tower tensors, see the module
    docstring) with the base it was trained against and the tower parts it holds."""
    metadata = {"format": "cloc-llava-projector", "vision_tower_parts": json.dumps(tower_parts(state))}
    if source is not None:
        metadata["model_source"] = json.dumps(source, sort_keys=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata=metadata)


def _read(path: str | os.PathLike[str]) -> tuple[Path, dict[str, str], dict[str, torch.Tensor]]:
    """``(file, metadata, tensors)`` of a ``mm_projector.safetensors`` file, or of the one in folder ``path``."""
    file = Path(path)
    if file.is_dir():
        file = file / MM_PROJECTOR_FILE
    if not file.is_file():
        raise ConfigError(f"pretrain_mm_projector={path}: no {MM_PROJECTOR_FILE} there")
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return file, metadata, state


def _check(file: Path, state: dict[str, torch.Tensor], targets: dict[str, nn.Parameter]) -> None:
    """Raise :class:`ConfigError` for keys this model lacks, a missing image projector or a shape mismatch."""
    unknown = sorted(set(state) - set(targets))
    if unknown:
        raise ConfigError(f"{file}: keys that are not projector or vision-tower weights of this model: {unknown[:5]}")
    projector_keys = {key for key in targets if key.startswith(PROJECTOR_PREFIXES)}
    missing = sorted(projector_keys - set(state))
    if any(key.startswith(PROJECTOR_PREFIXES[0]) for key in missing):
        raise ConfigError(f"{file}: the image projector weights are missing: {missing[:5]}")
    if missing:
        logger.warning("%s has no region projector weights; the region projector starts fresh", file)
    for key, tensor in state.items():
        expected = full_shape(targets[key])
        if tensor.shape != expected:
            raise ConfigError(
                f"{file}: {key} has shape {tuple(tensor.shape)} but this model needs {tuple(expected)} "
                "(another LLM or vision tower?)"
            )


def load_projector(
    model: nn.Module, path: str | os.PathLike[str], expected_source: dict[str, Any] | None = None
) -> None:
    """Load stage 1's projector weights (a ``mm_projector.safetensors`` file, or a folder holding one), and the
    vision-tower tensors stage 1 trained when the file carries them (``model.vision_tower.*``).

    The image projector is required; a missing region projector is a warning (e.g. a projector from plain LLaVA).
    Every key must name a projector or vision-tower parameter of this model, with its shape. A different recorded
    base (``model_source``) is a warning: the projector was aligned to another LLM or vision tower. Under ZeRO-3 the
    weights are copied in through gathered parameters (collective: every rank calls this; each reads the file,
    rank 0's copy is kept).
    """
    file, metadata, state = _read(path)
    targets = {**projector_parameters(model), **tower_parameters(model)}
    _check(file, state, targets)
    recorded = metadata.get("model_source")
    if (
        expected_source is not None
        and recorded is not None
        and json.loads(recorded) != json.loads(json.dumps(expected_source))
    ):
        logger.warning("%s was trained against another base (%s) than this run's (%s)", file, recorded, expected_source)
    with torch.no_grad(), gathered([targets[key] for key in state], modifier_rank=0):
        for key, tensor in state.items():
            targets[key].copy_(tensor.to(targets[key].dtype))
    tower_keys = [key for key in state if key.startswith(TOWER_PREFIX)]
    parts = ", ".join(tower_parts(tower_keys)) or "none"
    logger.info(
        "loaded the stage-1 projector from %s with %d vision-tower tensors (parts: %s)", file, len(tower_keys), parts
    )


__all__ = [
    "FILE_PREFIXES",
    "MM_PROJECTOR_FILE",
    "PROJECTOR_PREFIXES",
    "TOWER_PREFIX",
    "load_projector",
    "projector_parameters",
    "projector_state",
    "save_projector",
    "tower_parameters",
    "tower_parts",
]
