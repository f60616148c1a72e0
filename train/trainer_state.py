"""What both trainers (CLOC pretraining, MLLM stages) share about a running job: its progress
(:class:`TrainerState`), the objects the loop touches (:class:`Run`), and the collective skeleton of saving and
resuming a checkpoint through :mod:`train.checkpoint`.

Every rank calls :func:`save_run_checkpoint` and :func:`load_run_checkpoint` at the same step (they hold barriers
and, under DeepSpeed, the engine's collective save/load). Rank 0 writes the trainer's files, the optimizer and the
scheduler; every rank writes its RNG state; ``trainer_state.json`` is written last and the folder is renamed into
place only after all ranks are done.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cloc_encoder.distributed import DistributedContext
from train.checkpoint import (
    TRAINER_STATE,
    CheckpointManager,
    capture_rng_state,
    load_state,
    read_json,
    restore_rng_state,
    save_state,
    write_json,
)
from train.config import ConfigError
from train.metrics import MetricsLogger

logger = logging.getLogger(__name__)
DEEPSPEED_TAG = "deepspeed"


@dataclass
class TrainerState:
    """Progress of a run. ``micro_batches`` (per rank) is the sampler position; ``epoch``/``position`` say the same
    in data set terms. ``skipped_images`` counts unreadable images over all ranks."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    micro_batches: int = 0
    skipped_images: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    pending_skipped: int = field(default=0, repr=False)

    def note_batch(self, batch: Any) -> None:
        """Count what the collate step dropped from ``batch`` (this rank only, until :meth:`flush_skipped`)."""
        self.pending_skipped += len(batch.skipped)

    def flush_skipped(self, context: DistributedContext) -> dict[str, int]:
        """Add every rank's not-yet-counted skips to the totals (collective); returns the totals by name."""
        self.skipped_images += int(context.reduce({"skipped": self.pending_skipped}, op="sum")["skipped"])
        self.pending_skipped = 0
        return {"skipped_images": self.skipped_images}

    def to_json(self, config: Any, context: DistributedContext) -> dict[str, Any]:
        data = {key: value for key, value in asdict(self).items() if not key.startswith("pending_")}
        data.update(
            world_size=context.world_size,
            batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            seed=config.seed,
        )
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainerState:
        names = [name for name in cls.__dataclass_fields__ if not name.startswith("pending_")]
        return cls(**{name: data[name] for name in names if name in data})


@dataclass(kw_only=True)
class Run:
    """Everything the training loop touches. ``module`` is what is called (the model, its DDP wrapper or the
    DeepSpeed engine); ``model`` is the model being trained, never wrapped by DDP or DeepSpeed. ``peak_lrs`` is the
    schedule's peak, one for every parameter group or one per group."""

    config: Any
    context: DistributedContext
    manager: CheckpointManager
    model: nn.Module
    module: Any
    optimizer: Any
    scheduler: Any
    peak_lrs: float | list[float]
    tokenizer: Any
    processor: Any
    dataset: Any
    max_steps: int
    precision: str = "fp32"
    engine: Any = None
    ddp: Any = None
    metrics: MetricsLogger | None = None
    batches_per_epoch: int = 1

    def restore_rng(self, folder: Path) -> None:
        """Restore this rank's RNG state from a checkpoint (a warning when the world size changed)."""
        name = f"rng_state_rank{self.context.rank}"
        if (folder / f"{name}.json").exists():
            restore_rng_state(load_state(folder, name))
        else:
            logger.warning("%s has no %s; random streams will differ from the original run", folder, name)


def save_run_checkpoint(
    run: Run, state: TrainerState, write_files: Callable[[Path], None], *, exclude_frozen: bool = False
) -> Path:
    """Write ``step-NNNNNN`` atomically (collective: every rank calls it at the same step).

    ``write_files(folder)`` runs on every rank (so it may gather) and writes the trainer's own files on rank 0;
    this function adds the DeepSpeed engine state, RNG states, config, optimizer, scheduler and trainer state.
    """
    context, config, manager = run.context, run.config, run.manager
    state.flush_skipped(context)
    if context.is_main:
        manager.begin(state.step)
    context.barrier()
    tmp = manager.tmp_path(state.step)
    if run.engine is not None:
        options = {"exclude_frozen_parameters": True} if exclude_frozen else {}
        run.engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=False, **options)
    save_state(tmp, f"rng_state_rank{context.rank}", capture_rng_state())
    write_files(tmp)
    if context.is_main:
        config.save_yaml(tmp / "train_config.yaml")
        if run.engine is None:
            save_state(tmp, "optimizer", run.optimizer.state_dict())
            save_state(tmp, "scheduler", run.scheduler.state_dict())
    context.barrier()
    final = manager.path(state.step)
    if context.is_main:
        write_json(tmp / TRAINER_STATE, state.to_json(config, context))
        final = manager.commit(state.step)
        logger.info("saved checkpoint %s", final)
    context.barrier()
    return final


def load_run_checkpoint(
    run: Run, folder: Path, load_weights: Callable[[Path], None], *, strict_engine: bool = True
) -> dict[str, Any]:
    """Restore weights (``load_weights(folder)``, or the DeepSpeed engine's state), optimizer and scheduler, and
    put the schedule on the current config's curve; returns the saved ``trainer_state.json`` (RNG:
    :meth:`Run.restore_rng`)."""
    saved = read_json(folder / TRAINER_STATE)
    config, context = run.config, run.context
    before = saved.get("batch_size", config.batch_size) * saved.get("world_size", context.world_size)
    if before != config.batch_size * context.world_size:
        logger.warning(
            "resuming with a global batch of %d samples instead of %d: the data order will differ from the original",
            config.batch_size * context.world_size,
            before,
        )
    if run.engine is not None:
        if not (folder / DEEPSPEED_TAG).is_dir():
            raise RuntimeError(f"{folder} was not written under DeepSpeed; it holds no {DEEPSPEED_TAG}/ engine state")
        run.engine.load_checkpoint(
            str(folder),
            tag=DEEPSPEED_TAG,
            load_module_strict=strict_engine,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
    else:
        load_weights(folder)
        if not (folder / "optimizer.json").exists():
            raise RuntimeError(f"{folder} holds no optimizer.json (written under DeepSpeed? resume with deepspeed=...)")
        run.optimizer.load_state_dict(load_state(folder, "optimizer"))
        run.scheduler.load_state_dict(load_state(folder, "scheduler"))
    resync_schedule(run.scheduler, run.peak_lrs)
    return saved


def resync_schedule(scheduler: Any, peak_lr: float | Sequence[float]) -> None:
    """Set every group's lr from the *current* config's schedule at the restored step.

    The optimizer state holds the lr its last step left behind, computed with the old run's ``max_steps``; this
    makes a resumed run follow the new config (e.g. a raised ``max_steps``) and changes nothing otherwise.
    ``peak_lr`` is one peak for every parameter group, or one per group.
    """
    groups = scheduler.optimizer.param_groups
    peaks = [float(peak_lr)] * len(groups) if isinstance(peak_lr, (int, float)) else [float(p) for p in peak_lr]
    scheduler.base_lrs = list(peaks)
    for group, factor, peak in zip(groups, scheduler.lr_lambdas, peaks, strict=True):
        group["initial_lr"] = peak
        group["lr"] = peak * factor(scheduler.last_epoch)


def open_output_dir(config: Any, context: DistributedContext) -> tuple[CheckpointManager, Path | None]:
    """Create ``config.output_dir`` (rank 0), find the checkpoint to resume from (:func:`find_resume_dir`) and seed
    Python, NumPy and torch with ``config.seed``; returns the checkpoint manager and that checkpoint."""
    manager = CheckpointManager(config.output_dir, config.keep_last)
    if context.is_main:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    context.barrier()
    resume = find_resume_dir(config, manager)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    return manager, resume


def find_resume_dir(config: Any, manager: CheckpointManager) -> Path | None:
    """The checkpoint a run starts from: ``config.resume_from``, or with ``config.resume`` the latest one in
    ``output_dir`` (``None`` when there is none yet). A fresh start into an ``output_dir`` that already holds
    checkpoints is refused, so a forgotten ``--resume`` never overwrites a run."""
    if config.resume_from:
        folder = Path(config.resume_from)
        if not manager.is_complete(folder):
            raise ConfigError(f"resume_from={folder}: not a complete checkpoint (no trainer_state.json)")
        return folder
    latest = manager.latest()
    if config.resume:
        if latest is None:
            logger.info("resume: no checkpoint in %s yet; starting from scratch", config.output_dir)
        return latest
    if latest is not None:
        raise ConfigError(
            f"output_dir={config.output_dir} already holds checkpoints ({latest.name}); "
            "resume with --resume (resume=true) or choose another output_dir"
        )
    return None


def record_validation(run: Run, state: TrainerState, metrics: dict[str, float]) -> dict[str, Any]:
    """Append validation ``metrics`` (may be empty: nothing logged) to the history and the logs as ``val_*``."""
    if not metrics:
        return {}
    record = {"step": state.step, "epoch": round(state.micro_batches / run.batches_per_epoch, 4), **metrics}
    state.log_history.append(record)
    run.metrics.log(record, prefix="val")
    return record


__all__ = [
    "DEEPSPEED_TAG",
    "Run",
    "TrainerState",
    "find_resume_dir",
    "load_run_checkpoint",
    "open_output_dir",
    "record_validation",
    "resync_schedule",
    "save_run_checkpoint",
]
