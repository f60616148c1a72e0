"""CLOC pretraining: ``python -m train.cloc_pretrain --config train/configs/cloc_tiny.yaml [key=value ...]``.

From Python: ``train_cloc(load_config(path, overrides))`` returns a :class:`TrainResult`. Runs on one process,
under ``torchrun`` (DDP) or the ``deepspeed`` launcher (``deepspeed=train/deepspeed/zero2.json``); see
``docs/training_cloc.md``. The loop only orchestrates: the losses (and their cross-rank gathers) live in
``cloc_encoder``, data in :mod:`train.cloc.data`, checkpoints in :mod:`train.checkpoint`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cloc_encoder.data.format import ReadReport, RegionTextRecord, read_region_text
from cloc_encoder.data.shards import expand_shards, is_shard_spec, iter_shard_records
from cloc_encoder.image_processing import CLOCImageProcessor
from train.checkpoint import read_json
from train.cloc.build import build_model, build_optimizer, build_scheduler, build_tokenizer, text_length
from train.cloc.config import CLOCTrainConfig, load_config
from train.cloc.data import CLOCBatch, RegionTextDataset, RegionTextEncoder, collate_cloc
from train.cloc.run import CLOCRun, load_checkpoint, save_checkpoint
from train.cloc.streaming import StreamingBatches, shard_plan
from train.config import ConfigError
from train.loop import LoopHooks, distributed_session, forward, run_loop, start_run
from train.runtime import (
    deepspeed_config,
    launch_parser,
    prepare_launch,
    promote_scalar_parameters,
)
from train.samplers import ResumableBatchSampler
from train.trainer_state import TrainerState, open_output_dir

logger = logging.getLogger(__name__)
TOKENIZER_SAMPLES = 20_000
"""Streamed data: a tokenizer trained here learns from the texts of the first this many samples."""
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
    """The region-text records of ``path``; :class:`ConfigError` (one line, naming the file) when it is missing or
    holds no usable record — with the count of malformed records and the first reason."""
    report = ReadReport()
    try:
        records = read_region_text(path, report=report)
    except FileNotFoundError as error:
        raise ConfigError(f"{what}_data: {error}") from error
    if not records:
        first = f"; first: {report.skipped[0]}" if report.skipped else ""
        raise ConfigError(f"{what}_data {path}: no usable region-text record ({report.summary()}{first})")
    if report.skipped:
        logger.warning("%s data %s: %s (first: %s)", what, path, report.summary(), report.skipped[0])
    return records


def _scalar(value: Any) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _hooks(run: CLOCRun) -> LoopHooks:
    """The CLOC parts of the loop: the loss terms, the log line, checkpoints, the logit-scale clamp."""
    model, context, config = run.model, run.context, run.config

    def terms(batch: CLOCBatch) -> tuple[torch.Tensor, dict[str, float]]:
        output = forward(run, batch)
        values = {key: _scalar(getattr(output, key)) for key in LOSS_TERMS}
        return output.loss, {**values, "images": float(batch.num_images)}

    def log_fields(interval: dict[str, float], count: int, seconds: float) -> dict[str, Any]:
        fields = context.reduce({key: interval[key] / count for key in LOSS_TERMS})
        fields["logit_scale"] = float(model.logit_scale.detach().float().exp().mean())
        fields["region_logit_scale"] = float(model.region_logit_scale.detach().float().exp().mean())
        fields["images_per_s"] = interval["images"] * context.world_size / max(seconds, 1e-9)
        return fields

    def clamp_logit_scales() -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, config.logit_scale_max)
            model.region_logit_scale.clamp_(0.0, config.logit_scale_max)

    return LoopHooks(
        terms=terms,
        mean_terms=LOSS_TERMS,
        log_fields=log_fields,
        save=lambda state: save_checkpoint(run, state),
        collate=collate_cloc,
        after_optimizer_step=clamp_logit_scales if config.logit_scale_max is not None else None,
        desc="cloc",
    )


def _stream(config: CLOCTrainConfig, context: Any, encoder: RegionTextEncoder) -> StreamingBatches:
    """The batches of ``config.train_data``'s tar shards for this rank (:mod:`train.cloc.streaming`)."""
    try:
        plan = shard_plan(
            config.train_data, config.train_shard_sizes, batch_size=config.batch_size,
            world_size=context.world_size, seed=config.seed,
        )  # fmt: skip
    except (OSError, ValueError) as error:
        raise ConfigError(f"train_data={config.train_data}: {error}") from error
    logger.info(
        "streaming %d tar shards (%d samples), %d batches of %d per rank and epoch",
        len(plan.urls), sum(plan.sizes), plan.batches_per_epoch, config.batch_size,
    )  # fmt: skip
    return StreamingBatches(
        plan, encoder, collate_cloc, rank=context.rank, num_workers=config.num_workers,
        shuffle_buffer=config.shuffle_buffer, max_skipped_fraction=config.max_skipped_fraction,
    )  # fmt: skip


def _build_run(config: CLOCTrainConfig, context: Any) -> tuple[CLOCRun, Path | None, RegionTextDataset | None]:
    manager, resume = open_output_dir(config, context)
    streamed = is_shard_spec(config.train_data)
    if streamed:  # the tokenizer (when one is trained) learns from the texts of the first samples
        records: Iterable[RegionTextRecord] = iter_shard_records(expand_shards(config.train_data), TOKENIZER_SAMPLES)
    else:
        records = _load_records(config.train_data, "train")
    tokenizer = build_tokenizer(config, records, context, resume)
    model = build_model(config, tokenizer)
    processor = CLOCImageProcessor.for_model(model.config, resize_mode=config.resize_mode)
    length = text_length(config, model)
    options = {"max_regions": config.max_regions_per_image, "max_length": length, "seed": config.seed}
    encoder = RegionTextEncoder(processor, tokenizer, max_regions=config.max_regions_per_image, max_length=length)
    stream = _stream(config, context, encoder) if streamed else None
    dataset = stream if stream is not None else RegionTextDataset(records, processor, tokenizer, **options)
    val = None
    if config.val_data and is_shard_spec(config.val_data):
        raise ConfigError(f"val_data={config.val_data}: validation reads a region-text JSONL file, not tar shards")
    if config.val_data:
        val = RegionTextDataset(_load_records(config.val_data, "val"), processor, tokenizer, **options)
    model.to(context.device).train()
    scalar_shapes = promote_scalar_parameters(model) if config.deepspeed else {}
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    run = CLOCRun(
        config=config,
        context=context,
        manager=manager,
        model=model,
        module=model,
        optimizer=optimizer,
        scheduler=scheduler,
        peak_lrs=config.lr,
        tokenizer=tokenizer,
        processor=processor,
        dataset=dataset,
        max_steps=config.max_steps,
        precision=config.precision,
        scalar_shapes=scalar_shapes,
        stream=stream,
    )
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
    with distributed_session(config.device, use_deepspeed=bool(config.deepspeed)) as context:
        run, resume, val = _build_run(config, context)
        state = TrainerState()
        if resume is not None:
            state = load_checkpoint(run, resume)
            logger.info("resumed from %s at step %d", resume, state.step)
        sampler: ResumableBatchSampler | StreamingBatches
        if run.stream is not None:
            sampler = run.stream
        else:
            sampler = ResumableBatchSampler(
                len(run.dataset), config.batch_size, seed=config.seed, rank=context.rank, world_size=context.world_size
            )
        hooks = _hooks(run)
        batches = start_run(run, state, resume, sampler, hooks)
        outcome = run_loop(
            run, state, batches, sampler, hooks, val_dataset=val, start=start, step_callback=step_callback
        )
        return TrainResult(
            step=state.step,
            epoch=state.epoch,
            metrics=outcome.metrics,
            val_metrics=outcome.val_metrics,
            checkpoint=outcome.checkpoint,
            output_dir=Path(config.output_dir),
            stop_reason=outcome.stop_reason,
            skipped_images=state.flush_skipped(context)["skipped_images"],
            elapsed_s=time.perf_counter() - start,
            log_history=list(state.log_history),
        )


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


__all__ = ["LOSS_TERMS", "TrainResult", "main", "train_cloc"]


if __name__ == "__main__":
    sys.exit(main())
