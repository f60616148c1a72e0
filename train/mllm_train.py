"""MLLM training, both stages in one script: ``python -m train.mllm_train --config train/configs/mllm_stage1.yaml
[key=value ...]``.

Stage 1 (``stage=1``) trains the image and region projectors on a frozen vision tower and LLM (LLaVA's alignment
stage: lr 1e-3, one epoch) and writes ``mm_projector.safetensors``. Stage 2 (``stage=2``) starts from that
projector (``pretrain_mm_projector=...``) and trains the LLM — fully, with LoRA (``lora=true``), or QLoRA
(``lora=true bits=4``) — with the projectors, optionally the prompter and the ViT (lr 2e-5). From Python:
``train_mllm(load_mllm_config(path, overrides))`` returns an :class:`MLLMTrainResult`. Runs on one process, under
``torchrun`` (DDP) or the ``deepspeed`` launcher (ZeRO-2/3, ``train/deepspeed/*.json``); see
``docs/training_mllm.md``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from train.checkpoint import CheckpointManager
from train.cloc_build import lr_factor
from train.cloc_config import ConfigError
from train.cloc_data import EvalBatchSampler, ResumableBatchSampler
from train.cloc_metrics import MetricsLogger
from train.cloc_run import find_resume_dir, record_validation
from train.cloc_runtime import deepspeed_config, init_distributed, launch_parser, prepare_launch
from train.mllm_build import (
    MM_PROJECTOR_FILE,
    apply_lora,
    build_model,
    build_optimizer,
    build_processor,
    build_tokenizer,
    configure_trainable,
    model_source,
    parameter_groups,
    unwrap,
    upcast_trainable,
)
from train.mllm_config import MLLMTrainConfig, load_mllm_config
from train.mllm_conversations import conversation_read_report, read_conversations
from train.mllm_data import (
    CollateConfig,
    ConversationDataset,
    LengthGroupedBatchSampler,
    MLLMBatch,
    collate_conversations,
)
from train.mllm_run import MLLMRun, MLLMTrainerState, load_mllm_checkpoint, save_mllm_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class MLLMTrainResult:
    """What a run ended with. ``checkpoint`` is the final ``step-NNNNNN`` folder; ``mm_projector`` the projector file
    at the top of ``output_dir`` (a copy of the final checkpoint's)."""

    stage: int
    step: int
    max_steps: int
    epoch: int
    metrics: dict[str, Any]
    val_metrics: dict[str, float] | None
    checkpoint: Path | None
    mm_projector: Path | None
    output_dir: Path
    stop_reason: str
    skipped_images: int
    skipped_too_long: int
    trainable_parameters: dict[str, int]
    elapsed_s: float
    log_history: list[dict[str, Any]] = field(default_factory=list)
    model: Any = field(default=None, repr=False)
    """The trained model (a PEFT model with LoRA); under ZeRO-3 its weights are partitioned — load a checkpoint."""
    processor: Any = field(default=None, repr=False)


def _load_records(config: MLLMTrainConfig, path: str, what: str) -> list:
    report = conversation_read_report()
    records = read_conversations(path, image_folder=config.image_folder, report=report)
    if report.skipped:
        logger.warning("%s data %s: %s (first: %s)", what, path, report.summary(), report.skipped[0])
    if not records:
        raise ConfigError(f"{what} data {path}: no usable conversation ({report.summary()})")
    return records


def _zero3_auto_values(model: torch.nn.Module) -> dict[str, Any]:
    """transformers' sizes for ZeRO-3 buckets, from the LLM's hidden size (what ``"auto"`` means in our JSONs)."""
    hidden = unwrap(model).config.text_config.hidden_size
    return {
        "zero_optimization.reduce_bucket_size": hidden * hidden,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
    }


def _build_run(config: MLLMTrainConfig, context: Any) -> tuple[MLLMRun, Path | None, ConversationDataset | None, Any]:
    manager = CheckpointManager(config.output_dir, config.keep_last)
    if context.is_main:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    context.barrier()
    resume = find_resume_dir(config, manager)
    precision = config.resolved_precision()
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    records = _load_records(config, config.train_data, "train")
    tokenizer = build_tokenizer(config, records, context, resume)
    factory = functools.partial(build_processor, config, tokenizer=tokenizer)
    model, processor, base_dir = build_model(config, tokenizer, factory, context, precision)
    source = model_source(config, tokenizer)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if config.lora:
        model = apply_lora(model, config)
    counts = configure_trainable(model, config)
    logger.info("trainable parameters: %s", counts)
    if not config.deepspeed:
        upcast_trainable(model)
    if config.bits is None and not config.deepspeed:  # DeepSpeed places (and under ZeRO-3 partitions) the model
        model.to(context.device)
    model.train()
    dataset = ConversationDataset(
        records, processor, max_length=config.max_length, assistant_mask=config.assistant_mask
    )
    dataset[(0, 0)]  # a template / label-mask mismatch fails here, before any training (LabelMaskingError)
    val = None
    if config.val_data:
        val_records = _load_records(config, config.val_data, "val")
        val = ConversationDataset(
            val_records, processor, max_length=config.max_length, assistant_mask=config.assistant_mask
        )
    options = {"seed": config.seed, "rank": context.rank, "world_size": context.world_size}
    if config.group_by_length:
        sampler = LengthGroupedBatchSampler(dataset.lengths, config.batch_size, **options)
    else:
        sampler = ResumableBatchSampler(len(dataset), config.batch_size, **options)
    batches_per_epoch = sampler.batches_per_epoch
    max_steps = config.max_steps or max(
        1, math.ceil(config.num_epochs * batches_per_epoch / config.gradient_accumulation_steps)
    )
    warmup = config.warmup_steps if config.warmup_steps is not None else math.ceil(config.warmup_ratio * max_steps)
    groups, peaks = parameter_groups(model, config)
    optimizer = build_optimizer(groups, config)
    scheduler = LambdaLR(optimizer, lr_factor(warmup, max_steps, config.min_lr_ratio))
    run = MLLMRun(
        config=config,
        context=context,
        manager=manager,
        model=model,
        module=model,
        optimizer=optimizer,
        scheduler=scheduler,
        peak_lrs=peaks,
        tokenizer=tokenizer,
        processor=processor,
        dataset=dataset,
        precision=precision,
        source=source,
        base_dir=base_dir,
        batches_per_epoch=batches_per_epoch,
        max_steps=max_steps,
        trainable_counts=counts,
    )
    if config.deepspeed:
        import deepspeed

        ds_config = deepspeed_config(config.deepspeed, _with_precision(config, precision), context.world_size,
                                     auto_values=_zero3_auto_values(model))  # fmt: skip
        engine, run.optimizer, _, run.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        run.engine = run.module = engine
    return run, resume, val, sampler


def _with_precision(config: MLLMTrainConfig, precision: str) -> MLLMTrainConfig:
    resolved = copy.copy(config)
    resolved.precision = precision  # type: ignore[assignment]
    return resolved


def _forward(run: MLLMRun, batch: MLLMBatch) -> torch.Tensor:
    dtype = torch.bfloat16 if run.engine is not None and run.precision == "bf16" else None
    inputs = batch.to(run.context.device, dtype).inputs
    autocast = (
        torch.autocast(run.context.device.type, dtype=torch.bfloat16)
        if run.engine is None and run.precision == "bf16"
        else contextlib.nullcontext()
    )
    with autocast:
        return run.module(**inputs, use_cache=False).loss


def _train_step(run: MLLMRun, batches: Iterator[MLLMBatch], state: MLLMTrainerState) -> dict[str, float]:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
    accumulation = run.config.gradient_accumulation_steps
    terms = {"loss": 0.0, "supervised_tokens": 0.0, "tokens": 0.0, "samples": 0.0}
    lr = run.optimizer.param_groups[0]["lr"]
    grad_norm = None
    for micro in range(accumulation):
        batch = next(batches)
        state.pending_skipped += len(batch.skipped)
        state.pending_too_long += len(batch.too_long)
        last = micro == accumulation - 1
        sync = contextlib.nullcontext() if last or run.ddp is None else run.ddp.no_sync()
        with sync:
            loss = _forward(run, batch)
            if run.engine is not None:
                run.engine.backward(loss)
                run.engine.step()
            else:
                (loss / accumulation).backward()
        terms["loss"] += float(loss.detach()) / accumulation
        terms["supervised_tokens"] += batch.num_supervised
        terms["tokens"] += batch.num_tokens
        terms["samples"] += len(batch.ids)
    if run.engine is not None:
        grad_norm = run.engine.get_global_grad_norm()
    else:
        if run.config.grad_clip:
            trainable = [p for p in run.model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, run.config.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.micro_batches += accumulation
    terms["lr"] = float(lr)
    if grad_norm is not None:
        terms["grad_norm"] = float(grad_norm)
    return terms


@torch.no_grad()
def evaluate(run: MLLMRun, dataset: ConversationDataset, collate: Callable) -> dict[str, float]:
    """Mean validation loss over at most ``val_max_batches`` batches per rank."""
    context, config = run.context, run.config
    sampler = EvalBatchSampler(
        len(dataset), config.batch_size, rank=context.rank, world_size=context.world_size,
        max_batches=config.val_max_batches,
    )  # fmt: skip
    if len(sampler) == 0:
        logger.warning("validation set smaller than one global batch; skipped")
        return {}
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=config.num_workers)
    run.module.eval()
    total = 0.0
    for batch in loader:
        total += float(_forward(run, batch)) / len(sampler)
    run.module.train()
    return {"val_loss": context.reduce({"loss": total})["loss"]}


def _log(run: MLLMRun, state: MLLMTrainerState, interval: dict[str, float], count: int, seconds: float) -> dict:
    context = run.context
    sums = context.reduce(
        {"loss": interval["loss"], "supervised_tokens": interval["supervised_tokens"],
         "tokens": interval["tokens"], "samples": interval["samples"]},
        op="sum",
    )  # fmt: skip
    record: dict[str, Any] = {"step": state.step, "epoch": round(state.micro_batches / run.batches_per_epoch, 4)}
    record["loss"] = sums["loss"] / (count * context.world_size)
    record["lr"] = interval["lr"]
    if "grad_norm" in interval:
        record["grad_norm"] = interval["grad_norm"]
    record["supervised_tokens"] = int(sums["supervised_tokens"])
    record["tokens_per_s"] = sums["tokens"] / max(seconds, 1e-9)
    record["samples_per_s"] = sums["samples"] / max(seconds, 1e-9)
    record["skipped_images"] = state.flush_skipped(context)
    record["skipped_too_long"] = state.skipped_too_long
    state.log_history.append(record)
    run.metrics.log(record)
    return record


def train_mllm(
    config: MLLMTrainConfig, step_callback: Callable[[MLLMTrainerState], None] | None = None
) -> MLLMTrainResult:
    """Train as ``config`` says (stage 1 or 2); resumable, distributed when launched so.

    ``step_callback(state)`` runs after every optimizer step (and its logging / checkpointing).
    """
    config.validate()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    context = init_distributed(config.device, use_deepspeed=bool(config.deepspeed))
    run = None
    try:
        run, resume, val, sampler = _build_run(config, context)
        state = MLLMTrainerState()
        if resume is not None:
            state = load_mllm_checkpoint(run, resume)
            logger.info("resumed from %s at step %d", resume, state.step)
        if context.world_size > 1 and run.engine is None:
            device_ids = [context.device.index] if context.device.type == "cuda" else None
            run.ddp = run.module = torch.nn.parallel.DistributedDataParallel(
                run.model, device_ids=device_ids, find_unused_parameters=config.tune_vision_tower
            )
        if context.is_main:
            run.manager.remove_stale_tmp()
            config.save_yaml(Path(config.output_dir) / "train_config.yaml")
        sampler.start = state.micro_batches
        collate = functools.partial(collate_conversations, config=_collate_config(run))
        loader = DataLoader(
            run.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=config.num_workers,
            generator=torch.Generator().manual_seed(config.seed), persistent_workers=config.num_workers > 0,
            pin_memory=context.device.type == "cuda",
        )  # fmt: skip
        batches = iter(loader)
        if resume is not None:
            run.restore_rng(resume)
        run.metrics = MetricsLogger(
            config.output_dir,
            resume_step=state.step if resume is not None else None,
            tensorboard=config.tensorboard,
            enabled=context.is_main,
        )
        return _loop(run, state, batches, sampler, val, collate, start, step_callback)
    finally:
        if run is not None and run.metrics is not None:
            run.metrics.close()
        context.shutdown()


def _collate_config(run: MLLMRun) -> CollateConfig:
    model_config = unwrap(run.model).config
    return CollateConfig(
        pad_token_id=run.tokenizer.pad_token_id,
        image_token_id=model_config.image_token_id,
        region_token_id=model_config.region_token_id,
        image_seq_length=model_config.image_seq_length,
        image_size=model_config.vision_config.vision_config.image_size,
    )


def _loop(
    run: MLLMRun,
    state: MLLMTrainerState,
    batches: Iterator[MLLMBatch],
    sampler: ResumableBatchSampler,
    val: ConversationDataset | None,
    collate: Callable,
    start: float,
    step_callback: Callable[[MLLMTrainerState], None] | None,
) -> MLLMTrainResult:
    config, context = run.config, run.context
    history = state.log_history
    last_record: dict[str, Any] = next((r for r in reversed(history) if "loss" in r), {})
    val_metrics = next((r for r in reversed(history) if "val_loss" in r and r["step"] == state.step), None)
    saved_step = state.step if state.step else -1
    interval: dict[str, float] = {}
    count, tick = 0, time.perf_counter()
    stop_reason = "max_steps"
    progress = tqdm(
        total=run.max_steps, initial=state.step, disable=not (context.is_main and config.progress_bar),
        desc=f"mllm stage {config.stage}", dynamic_ncols=True,
    )  # fmt: skip
    while state.step < run.max_steps:
        terms = _train_step(run, batches, state)
        state.epoch, state.position = sampler.locate(state.micro_batches)
        for key, value in terms.items():
            interval[key] = interval.get(key, 0.0) + value if key not in ("lr", "grad_norm") else value
        count += 1
        progress.update(1)
        if not math.isfinite(terms["loss"]):
            logger.warning("non-finite loss %s at step %d", terms["loss"], state.step)
        if state.step % config.log_every == 0 or state.step == run.max_steps:
            last_record = _log(run, state, interval, count, time.perf_counter() - tick)
            progress.set_postfix(loss=f"{last_record['loss']:.4f}")
            interval, count, tick = {}, 0, time.perf_counter()
        if val is not None and config.eval_every and state.step % config.eval_every == 0:
            val_metrics = _validate(run, state, val, collate)
        if config.save_every and state.step % config.save_every == 0:
            save_mllm_checkpoint(run, state)
            saved_step = state.step
        if step_callback is not None:
            step_callback(state)
        if config.max_minutes is not None:
            over = (time.perf_counter() - start) / 60.0 >= config.max_minutes
            if context.reduce({"over": float(over)}, op="max")["over"] > 0:
                stop_reason = "max_minutes"
                break
    progress.close()
    if count:
        last_record = _log(run, state, interval, count, time.perf_counter() - tick)
    if val is not None and (val_metrics is None or val_metrics.get("step") != state.step):
        val_metrics = _validate(run, state, val, collate)
    checkpoint = run.manager.path(saved_step) if saved_step == state.step else save_mllm_checkpoint(run, state)
    projector = Path(config.output_dir) / MM_PROJECTOR_FILE
    if context.is_main:
        tmp = projector.with_suffix(".tmp")
        shutil.copyfile(checkpoint / MM_PROJECTOR_FILE, tmp)
        os.replace(tmp, projector)
    context.barrier()
    return MLLMTrainResult(
        stage=config.stage,
        step=state.step,
        max_steps=run.max_steps,
        epoch=state.epoch,
        metrics=last_record,
        val_metrics=val_metrics,
        checkpoint=checkpoint,
        mm_projector=projector,
        output_dir=Path(config.output_dir),
        stop_reason=stop_reason,
        skipped_images=state.flush_skipped(context),
        skipped_too_long=state.skipped_too_long,
        trainable_parameters=dict(run.trainable_counts),
        elapsed_s=time.perf_counter() - start,
        log_history=list(state.log_history),
        model=run.model,
        processor=run.processor,
    )


def _validate(run: MLLMRun, state: MLLMTrainerState, val: ConversationDataset, collate: Callable) -> dict:
    return record_validation(run.metrics, state, run.batches_per_epoch, evaluate(run, val, collate))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = launch_parser(
        "python -m train.mllm_train",
        "CLOC-LLaVA stage 1 / 2 training",
        "YAML config (train/configs/mllm_stage1.yaml, mllm_stage2.yaml)",
    )
    args = parser.parse_args(argv)
    rank = prepare_launch(args)
    try:
        config = load_mllm_config(args.config, args.overrides)
        if args.resume:
            config.resume = True
        result = train_mllm(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if rank == "0":
        print(f"done: stage {result.stage}, step {result.step}/{result.max_steps} ({result.stop_reason}), "
              f"loss {result.metrics.get('loss')}, checkpoint {result.checkpoint}, projector {result.mm_projector}, "
              f"{result.skipped_images} images skipped, {result.skipped_too_long} samples too long")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
