"""The state of a running MLLM training job, and saving / resuming it through :mod:`train.checkpoint`.

A checkpoint ``step-NNNNNN/`` holds what a user needs from that point of the run, plus what resuming needs:

=====================================  ==============================================================================
``mm_projector.safetensors``           both projectors (always; what stage 2's ``pretrain_mm_projector`` reads),
                                       plus the vision-tower parameters the run trains (prompter, ViT when tuned)
``model.safetensors``, ``config.json`` stage 2 full fine-tuning: the whole model (``save_pretrained``; loadable alone)
``adapter_model.safetensors`` + cfg    stage 2 LoRA: the PEFT adapter, plus ``non_lora_trainables.safetensors``
                                       (projectors, prompter, ViT when tuned) and ``lora_info.json`` (the base folder)
``trainable.safetensors``              every trainable parameter (resume without DeepSpeed; not for full fine-tuning)
tokenizer files, processor files       the tokenizer (with the chat template) and the processor
``optimizer.*``, ``scheduler.json``    optimizer / schedule state (no DeepSpeed), tensors in safetensors, no pickle
``deepspeed/``                         under DeepSpeed: the engine's checkpoint (frozen weights excluded)
``rng_state_rank<r>.json``             every rank's RNG states
``train_config.yaml``, ``trainer_state.json`` (written last)
=====================================  ==============================================================================

Frozen weights are never stored in a step checkpoint: the trainer rebuilds them deterministically from the config
(``model_path`` / ``vision_tower`` / ``language_model`` / ``init_seed``, plus the tower parts ``pretrain_mm_projector``
carries). Every rank calls :func:`save_mllm_checkpoint` and :func:`load_mllm_checkpoint` at the same step (barriers,
DeepSpeed's collective save/load, ZeRO-3 gathers).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cloc_encoder.distributed import DistributedContext
from train.checkpoint import TRAINER_STATE, read_json, write_json
from train.mllm.data import INVALID_EXAMPLES
from train.mllm.projector import FILE_PREFIXES, MM_PROJECTOR_FILE, save_projector
from train.mllm.trainable import unwrap
from train.trainer_state import Run, TrainerState, load_run_checkpoint, save_run_checkpoint

logger = logging.getLogger(__name__)
TRAINABLE_FILE = "trainable.safetensors"
NON_LORA_FILE = "non_lora_trainables.safetensors"
LORA_INFO_FILE = "lora_info.json"
PEFT_PREFIX = "base_model.model."


@dataclass
class MLLMTrainerState(TrainerState):
    """:class:`~train.trainer_state.TrainerState` plus ``skipped_too_long`` (samples that could not fit
    ``max_length``) and ``skipped_invalid`` (invalid records: label mask, processor; the first few reasons this rank
    met are kept in ``pending_invalid_examples`` and logged)."""

    skipped_too_long: int = 0
    skipped_invalid: int = 0
    pending_too_long: int = field(default=0, repr=False)
    pending_invalid: int = field(default=0, repr=False)
    pending_invalid_examples: list[str] = field(default_factory=list, repr=False)

    def note_batch(self, batch: Any) -> None:
        super().note_batch(batch)
        self.pending_too_long += len(batch.too_long)
        self.pending_invalid += len(batch.invalid)
        for reason in batch.invalid[: max(0, INVALID_EXAMPLES - len(self.pending_invalid_examples))]:
            logger.warning("skipped an invalid training sample: %s", reason)
            self.pending_invalid_examples.append(reason)

    def flush_skipped(self, context: DistributedContext) -> dict[str, int]:
        pending = {"images": self.pending_skipped, "long": self.pending_too_long, "invalid": self.pending_invalid}
        totals = context.reduce(pending, op="sum")
        self.skipped_images += int(totals["images"])
        self.skipped_too_long += int(totals["long"])
        self.skipped_invalid += int(totals["invalid"])
        self.pending_skipped = self.pending_too_long = self.pending_invalid = 0
        return {
            "skipped_images": self.skipped_images,
            "skipped_too_long": self.skipped_too_long,
            "skipped_invalid": self.skipped_invalid,
        }

    def to_json(self, config: Any, context: DistributedContext) -> dict[str, Any]:
        return {**super().to_json(config, context), "stage": config.stage}


@dataclass(kw_only=True)
class MLLMRun(Run):
    """A :class:`~train.trainer_state.Run` whose ``model`` is a PEFT wrapper with LoRA, else the
    :class:`~mllm.CLOCLlavaForConditionalGeneration`. ``source`` describes where the frozen weights come from,
    ``base_dir`` the base model folder a LoRA adapter refers to."""

    source: dict[str, Any] = field(default_factory=dict)
    base_dir: Path | None = None
    trainable_counts: dict[str, int] = field(default_factory=dict)

    @property
    def is_lora(self) -> bool:
        return self.model is not unwrap(self.model)

    @property
    def full_model(self) -> bool:
        """Stage 2 full fine-tuning: checkpoints hold the whole model."""
        return self.config.stage == 2 and not self.is_lora

    @property
    def zero3(self) -> bool:
        return self.engine is not None and self.engine.zero_optimization_stage() == 3

    def trainable_names(self) -> list[str]:
        return [name for name, parameter in self.model.named_parameters() if parameter.requires_grad]


def gather_state(run: MLLMRun, everything: bool = False) -> dict[str, torch.Tensor] | None:
    """Trainable parameters (or, with ``everything``, the full state dict) as CPU tensors on rank 0, ``None`` on the
    other ranks. Collective under ZeRO-3 (parameters are gathered layer by layer)."""
    if run.zero3:
        state = run.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=not everything)
        if state is None:
            return None
        if not everything:
            wanted = set(run.trainable_names())
            state = {k: v for k, v in state.items() if k in wanted}
        return dict(state)
    if not run.context.is_main:
        return None
    if everything:
        return {k: v.detach().cpu() for k, v in run.model.state_dict().items()}
    return {n: p.detach().cpu().clone() for n, p in run.model.named_parameters() if p.requires_grad}


def _unwrapped_name(name: str) -> str:
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def _mm_projector_state(trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``mm_projector.safetensors`` holds, from the gathered trainable tensors: both projectors and the
    vision-tower parameters that trained, under their names in the full model."""
    plain = {_unwrapped_name(name): tensor for name, tensor in trainable.items()}
    return {name: tensor for name, tensor in plain.items() if name.startswith(FILE_PREFIXES)}


def _write_outputs(run: MLLMRun, folder: Path, trainable: dict[str, torch.Tensor], full: dict | None) -> None:
    """Rank 0: the user-facing files of a checkpoint (see the module docstring)."""
    inner = unwrap(run.model)
    save_projector(_mm_projector_state(trainable), folder / MM_PROJECTOR_FILE, run.source)
    if run.full_model:
        inner.save_pretrained(folder, state_dict=full)
    else:
        save_file({k: v.contiguous() for k, v in trainable.items()}, str(folder / TRAINABLE_FILE))
    if run.is_lora:
        run.model.peft_config["default"].base_model_name_or_path = str(run.base_dir.resolve()) if run.base_dir else None
        run.model.save_pretrained(folder, state_dict=trainable)
        others = {_unwrapped_name(k): v.contiguous() for k, v in trainable.items() if "lora_" not in k}
        save_file(others, str(folder / NON_LORA_FILE))
        write_json(folder / LORA_INFO_FILE, {"base_model": str(run.base_dir.resolve()) if run.base_dir else None})
    run.tokenizer.save_pretrained(folder)
    run.processor.save_pretrained(folder)
    if not run.full_model:
        # the architecture, for reference (no weights here: load stage-1 / LoRA results as the docs say)
        (folder / "model_config.json").write_text(inner.config.to_json_string(), encoding="utf-8")


def save_mllm_checkpoint(run: MLLMRun, state: MLLMTrainerState) -> Path:
    """Write ``step-NNNNNN`` atomically (collective: every rank calls it at the same step)."""

    def write_files(folder: Path) -> None:
        full = gather_state(run, everything=True) if run.full_model else None
        trainable = gather_state(run)
        if run.context.is_main:
            _write_outputs(run, folder, trainable, full)

    return save_run_checkpoint(run, state, write_files, exclude_frozen=True)


def _load_full_model(model: nn.Module, folder: Path) -> None:
    """``model.safetensors`` (or its shards) into the model; only tied weights may be missing."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(folder / file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"{folder}: model.safetensors does not match (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def load_mllm_checkpoint(run: MLLMRun, folder: Path) -> MLLMTrainerState:
    """Restore trainable weights, optimizer, scheduler and progress (RNG: :meth:`MLLMRun.restore_rng`)."""
    stage = read_json(folder / TRAINER_STATE).get("stage", run.config.stage)
    if stage != run.config.stage:
        raise RuntimeError(f"{folder} is a stage-{stage} checkpoint; this run is stage {run.config.stage}")

    def load_weights(path: Path) -> None:
        if run.full_model:
            _load_full_model(unwrap(run.model), path)
            return
        state = load_file(str(path / TRAINABLE_FILE))
        expected = set(run.trainable_names())
        if set(state) != expected:
            raise RuntimeError(
                f"{path}: the trainable parameters differ from this run's (saved {len(state)}, here "
                f"{len(expected)}; e.g. {sorted(set(state) ^ expected)[:3]}): same stage, LoRA and tune_* flags?"
            )
        _, unexpected = run.model.load_state_dict(state, strict=False)
        if unexpected:
            raise RuntimeError(f"{path}: unexpected keys {unexpected[:5]}")

    saved = load_run_checkpoint(run, folder, load_weights, strict_engine=False)
    return MLLMTrainerState.from_json(saved)


def read_lora_info(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / LORA_INFO_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


__all__ = [
    "LORA_INFO_FILE",
    "NON_LORA_FILE",
    "TRAINABLE_FILE",
    "MLLMRun",
    "MLLMTrainerState",
    "gather_state",
    "load_mllm_checkpoint",
    "read_lora_info",
    "save_mllm_checkpoint",
]
