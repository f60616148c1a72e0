"""CLOC pretraining: ``python -m train.cloc_pretrain --config train/configs/cloc_tiny.yaml [key=value ...]``.

From Python: ``train_cloc(load_config(path, overrides))`` returns a :class:`TrainResult`. Runs on one process,
under ``torchrun`` (DDP) or the ``deepspeed`` launcher (``deepspeed=train/deepspeed/zero2.json``); see
``docs/training_cloc.md``. The loop only orchestrates: the losses (and their cross-rank gathers) live in
``cloc_encoder``, data in :mod:`train.cloc_data`, checkpoints in :mod:`train.checkpoint`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cloc_encoder.data.format import ReadReport, read_region_text
from cloc_encoder.image_processing import CLOCImageProcessor
from train.checkpoint import CheckpointManager, read_json
from train.cloc_build import build_model, build_optimizer, build_scheduler, build_tokenizer, text_length
from train.cloc_config import CLOCTrainConfig, ConfigError, load_config
from train.cloc_data import CLOCBatch, EvalBatchSampler, RegionTextDataset, ResumableBatchSampler, collate_cloc
from train.cloc_metrics import MetricsLogger
from train.cloc_run import Run, TrainerState, find_resume_dir, load_checkpoint, record_validation, save_checkpoint
from train.cloc_runtime import (
    deepspeed_config,
    init_distributed,
    launch_parser,
    prepare_launch,
    promote_scalar_parameters,
)

logger = logging.getLogger(__name__)
LOSS_TERMS = ("loss", "loss_clip", "loss_region", "loss_grounding", "region_weight")


@dataclass
class TrainResult:
    """What a run ended with. ``metrics`` is the last logged training record; ``checkpoint`` the final one."""

    step: int
    epoch: int
    metrics: dict[str, Any]
    val_metrics: dict[str, float] | None
    checkpoint: Path | None
    output_dir: Path
    stop_reason: str
    skipped_images: int
    elapsed_s: float
    log_history: list[dict[str, Any]] = field(default_factory=list)


def _load_records(path: str, what: str) -> list:
    report = ReadReport()
    records = read_region_text(path, report=report)
    if report.skipped:
        logger.warning("%s data %s: %s (first: %s)", what, path, report.summary(), report.skipped[0])
    return records


def _scalar(value: Any) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _forward(run: Run, batch: CLOCBatch) -> Any:
    dtype = torch.bfloat16 if run.engine is not None and run.config.precision == "bf16" else None
    inputs = batch.to(run.context.device, dtype).inputs
    autocast = (
        torch.autocast(run.context.device.type, dtype=torch.bfloat16)
        if run.engine is None and run.config.precision == "bf16"
        else contextlib.nullcontext()
    )
    with autocast:
        return run.module(**inputs)


def _train_step(run: Run, batches: Iterator[CLOCBatch], state: TrainerState) -> dict[str, float]:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns the step's loss terms."""
    accumulation = run.config.gradient_accumulation_steps
    sums = dict.fromkeys(LOSS_TERMS, 0.0)
    lr = run.engine.get_lr()[0] if run.engine is not None else run.optimizer.param_groups[0]["lr"]
    grad_norm = None
    for micro in range(accumulation):
        batch = next(batches)
        state.pending_skipped += len(batch.skipped)
        last = micro == accumulation - 1
        sync = contextlib.nullcontext() if last or run.ddp is None else run.ddp.no_sync()
        with sync:
            output = _forward(run, batch)
            if run.engine is not None:
                run.engine.backward(output.loss)
                run.engine.step()
            else:
                (output.loss / accumulation).backward()
        for key in LOSS_TERMS:
            sums[key] += _scalar(getattr(output, key)) / accumulation
    if run.engine is not None:
        grad_norm = run.engine.get_global_grad_norm()
    else:
        if run.config.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if run.config.logit_scale_max is not None:
            with torch.no_grad():
                run.model.logit_scale.clamp_(0.0, run.config.logit_scale_max)
                run.model.region_logit_scale.clamp_(0.0, run.config.logit_scale_max)
    state.step += 1
    state.micro_batches += accumulation
    sums["lr"] = float(lr)
    if grad_norm is not None:
        sums["grad_norm"] = float(grad_norm)
    return sums


@torch.no_grad()
def evaluate(run: Run, dataset: RegionTextDataset) -> dict[str, float]:
    """Mean loss terms over the validation set (at most ``val_max_batches`` batches per rank)."""
    context, config = run.context, run.config
    sampler = EvalBatchSampler(
        len(dataset), config.batch_size, rank=context.rank, world_size=context.world_size,
        max_batches=config.val_max_batches,
    )  # fmt: skip
    if len(sampler) == 0:
        logger.warning("validation set smaller than one global batch; skipped")
        return {}
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_cloc, num_workers=config.num_workers)
    run.model.eval()
    sums = dict.fromkeys(LOSS_TERMS, 0.0)
    for batch in loader:
        output = _forward(run, batch)
        for key in LOSS_TERMS:
            sums[key] += _scalar(getattr(output, key)) / len(sampler)
    run.model.train()
    return {f"val_{key}": value for key, value in context.reduce(sums).items()}


def _log(run: Run, state: TrainerState, interval: dict[str, float], count: int, images: int, seconds: float) -> dict:
    context, model = run.context, run.model
    means = {key: value / count for key, value in interval.items() if key in LOSS_TERMS}
    record: dict[str, Any] = {"step": state.step, "epoch": round(state.micro_batches / run.batches_per_epoch, 4)}
    record.update(context.reduce(means))
    record["skipped_images"] = state.flush_skipped(context)
    record["lr"] = interval["lr"]
    if "grad_norm" in interval:
        record["grad_norm"] = interval["grad_norm"]
    record["logit_scale"] = float(model.logit_scale.detach().float().exp().mean())
    record["region_logit_scale"] = float(model.region_logit_scale.detach().float().exp().mean())
    record["images_per_s"] = images * context.world_size / max(seconds, 1e-9)
    state.log_history.append(record)
    run.metrics.log(record)
    return record


def _build_run(config: CLOCTrainConfig, context: Any) -> tuple[Run, Path | None, RegionTextDataset | None]:
    manager = CheckpointManager(config.output_dir, config.keep_last)
    if context.is_main:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    context.barrier()
    resume = find_resume_dir(config, manager)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    records = _load_records(config.train_data, "train")
    tokenizer = build_tokenizer(config, records, context, resume)
    model = build_model(config, tokenizer)
    processor = CLOCImageProcessor.for_model(model.config, resize_mode=config.resize_mode)
    length = text_length(config, model)
    options = {"max_regions": config.max_regions_per_image, "max_length": length, "seed": config.seed}
    dataset = RegionTextDataset(records, processor, tokenizer, **options)
    val = None
    if config.val_data:
        val = RegionTextDataset(_load_records(config.val_data, "val"), processor, tokenizer, **options)
    model.to(context.device).train()
    scalar_shapes = promote_scalar_parameters(model) if config.deepspeed else {}
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    run = Run(config, context, manager, model, model, optimizer, scheduler, tokenizer, processor, dataset)
    run.scalar_shapes = scalar_shapes
    if config.deepspeed:
        import deepspeed

        ds_config = deepspeed_config(config.deepspeed, config, context.world_size)
        if int(ds_config.get("zero_optimization", {}).get("stage", 0)) > 2:
            raise ConfigError("CLOC pretraining supports ZeRO stages 0-2 (the whole encoder fits on one device)")
        engine, run.optimizer, _, run.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        run.engine = run.module = engine
    return run, resume, val


def train_cloc(config: CLOCTrainConfig, step_callback: Callable[[TrainerState], None] | None = None) -> TrainResult:
    """Train a CLOC encoder as ``config`` says; resumable, distributed when launched so.

    ``step_callback(state)`` runs after every optimizer step (and its logging / checkpointing).
    """
    config.validate()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    context = init_distributed(config.device, use_deepspeed=bool(config.deepspeed))
    run = None
    try:
        run, resume, val = _build_run(config, context)
        state = TrainerState()
        if resume is not None:
            state = load_checkpoint(run, resume)
            logger.info("resumed from %s at step %d", resume, state.step)
        if context.world_size > 1 and run.engine is None:
            device_ids = [context.device.index] if context.device.type == "cuda" else None
            run.ddp = run.module = torch.nn.parallel.DistributedDataParallel(run.model, device_ids=device_ids)
        if context.is_main:
            run.manager.remove_stale_tmp()
            config.save_yaml(Path(config.output_dir) / "train_config.yaml")
        sampler = ResumableBatchSampler(
            len(run.dataset), config.batch_size, seed=config.seed, rank=context.rank,
            world_size=context.world_size, start=state.micro_batches,
        )  # fmt: skip
        loader = DataLoader(
            run.dataset, batch_sampler=sampler, collate_fn=collate_cloc, num_workers=config.num_workers,
            generator=torch.Generator().manual_seed(config.seed), persistent_workers=config.num_workers > 0,
            pin_memory=context.device.type == "cuda",
        )  # fmt: skip
        run.batches_per_epoch = sampler.batches_per_epoch
        batches = iter(loader)
        if resume is not None:
            run.restore_rng(resume)
        run.metrics = MetricsLogger(
            config.output_dir,
            resume_step=state.step if resume is not None else None,
            tensorboard=config.tensorboard,
            enabled=context.is_main,
        )
        return _loop(run, state, batches, sampler, val, start, step_callback)
    finally:
        if run is not None and run.metrics is not None:
            run.metrics.close()
        context.shutdown()


def _loop(
    run: Run,
    state: TrainerState,
    batches: Iterator[CLOCBatch],
    sampler: ResumableBatchSampler,
    val: RegionTextDataset | None,
    start: float,
    step_callback: Callable[[TrainerState], None] | None,
) -> TrainResult:
    config, context = run.config, run.context
    history = state.log_history
    last_record: dict[str, Any] = next((r for r in reversed(history) if "loss" in r), {})
    val_metrics = next((r for r in reversed(history) if "val_loss" in r and r["step"] == state.step), None)
    saved_step = state.step if state.step else -1
    interval: dict[str, float] = {}
    count, images, tick = 0, 0, time.perf_counter()
    stop_reason = "max_steps"
    progress = tqdm(
        total=config.max_steps, initial=state.step, disable=not (context.is_main and config.progress_bar),
        desc="cloc", dynamic_ncols=True,
    )  # fmt: skip
    while state.step < config.max_steps:
        step_terms = _train_step(run, batches, state)
        state.epoch, state.position = sampler.locate(state.micro_batches)
        for key, value in step_terms.items():
            interval[key] = interval.get(key, 0.0) + value if key in LOSS_TERMS else value
        count += 1
        images += config.batch_size * config.gradient_accumulation_steps
        progress.update(1)
        if not math.isfinite(step_terms["loss"]):
            logger.warning("non-finite loss %s at step %d", step_terms["loss"], state.step)
        if state.step % config.log_every == 0 or state.step == config.max_steps:
            last_record = _log(run, state, interval, count, images, time.perf_counter() - tick)
            progress.set_postfix(loss=f"{last_record['loss']:.4f}")
            interval, count, images, tick = {}, 0, 0, time.perf_counter()
        if val is not None and config.eval_every and state.step % config.eval_every == 0:
            val_metrics = _validate(run, state, val)
        if config.save_every and state.step % config.save_every == 0:
            save_checkpoint(run, state)
            saved_step = state.step
        if step_callback is not None:
            step_callback(state)
        if config.max_minutes is not None:
            over = (time.perf_counter() - start) / 60.0 >= config.max_minutes
            if context.reduce({"over": float(over)}, op="max")["over"] > 0:
                stop_reason = "max_minutes"
                break
    progress.close()
    if count:  # stopped by max_minutes between two logging steps
        last_record = _log(run, state, interval, count, images, time.perf_counter() - tick)
    if val is not None and (val_metrics is None or val_metrics.get("step") != state.step):
        val_metrics = _validate(run, state, val)
    checkpoint = run.manager.path(saved_step) if saved_step == state.step else save_checkpoint(run, state)
    return TrainResult(
        step=state.step,
        epoch=state.epoch,
        metrics=last_record,
        val_metrics=val_metrics,
        checkpoint=checkpoint,
        output_dir=Path(config.output_dir),
        stop_reason=stop_reason,
        skipped_images=state.flush_skipped(context),
        elapsed_s=time.perf_counter() - start,
        log_history=list(state.log_history),
    )


def _validate(run: Run, state: TrainerState, val: RegionTextDataset) -> dict[str, float]:
    return record_validation(run.metrics, state, run.batches_per_epoch, evaluate(run, val))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = launch_parser(
        "python -m train.cloc_pretrain", "CLOC pretraining", "YAML config (train/configs/cloc_tiny.yaml)"
    )
    args = parser.parse_args(argv)
    rank = prepare_launch(args)
    try:
        config = load_config(args.config, args.overrides)
        if args.resume:
            config.resume = True
        result = train_cloc(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if rank == "0":
        state = read_json(result.checkpoint / "trainer_state.json") if result.checkpoint else {}
        print(f"done: step {result.step} ({result.stop_reason}), checkpoint {result.checkpoint}, "
              f"loss {result.metrics.get('loss')}, {state.get('skipped_images', 0)} images skipped")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
