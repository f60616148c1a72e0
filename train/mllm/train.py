"""MLLM training, both stages in one script: ``python -m train.mllm_train --config train/configs/mllm_stage1.yaml
[key=value ...]``.

Stage 1 (``stage=1``) trains the image and region projectors on a frozen vision tower and LLM (LLaVA's alignment
stage: lr 1e-3, one epoch) and writes ``mm_projector.safetensors`` (LLaVA's ``pretrain_mm_mlp_adapter``); tower
parts it also trains (``tune_prompter``, ``tune_vision_tower``) travel in that file. Stage 2 (``stage=2``) starts
from it (``pretrain_mm_projector=...``: the projectors and any tuned tower parts) and trains the LLM — fully, with
LoRA (``lora=true``), or QLoRA (``lora=true bits=4``) — with the projectors, optionally the prompter and the ViT
(lr 2e-5). From Python:
``train_mllm(load_mllm_config(path, overrides))`` returns an :class:`MLLMTrainResult`. Runs on one process, under
``torchrun`` (DDP) or the ``deepspeed`` launcher (ZeRO-2/3, ``train/deepspeed/*.json``); see
``docs/training_mllm.md``.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from cloc_encoder.compat import enable_activation_checkpointing
from train.config import ConfigError
from train.loop import LoopHooks, distributed_session, forward, run_loop, start_run
from train.mllm.build import (
    build_model,
    build_processor,
    build_tokenizer,
    model_source,
    planned_text_config,
    upcast_trainable,
)
from train.mllm.config import MLLMTrainConfig, load_mllm_config
from train.mllm.conversations import conversation_read_report, read_conversations
from train.mllm.data import (
    CollateConfig,
    ConversationDataset,
    MLLMBatch,
    TooManyInvalidSamples,
    check_invalid_budget,
    collate_conversations,
)
from train.mllm.projector import MM_PROJECTOR_FILE
from train.mllm.run import MLLMRun, MLLMTrainerState, load_mllm_checkpoint, save_mllm_checkpoint
from train.mllm.trainable import apply_lora, build_optimizer, configure_trainable, parameter_groups, unwrap
from train.mllm.zero3 import is_zero3
from train.runtime import deepspeed_config, launch_parser, prepare_launch
from train.samplers import LengthGroupedBatchSampler, ResumableBatchSampler
from train.schedule import lr_factor
from train.trainer_state import open_output_dir

logger = logging.getLogger(__name__)


@dataclass
class MLLMTrainResult:
    """What a run ended with. ``checkpoint`` is the final ``step-NNNNNN`` folder; ``mm_projector`` the projector file
    at the top of ``output_dir`` (a copy of the final checkpoint's; with the tower parts the run tuned)."""

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
    skipped_invalid: int = 0
    """Invalid samples skipped (label mask, processor; see ``max_invalid_fraction``)."""
    log_history: list[dict[str, Any]] = field(default_factory=list)
    model: Any = field(default=None, repr=False)
    """The trained model (a PEFT model with LoRA); under ZeRO-3 its weights are partitioned — load a checkpoint.
    After a bf16 run without DeepSpeed its frozen parts are bf16 and its trained ones fp32 (the step ran under
    autocast): use :meth:`inference_model` to evaluate or generate with it."""
    processor: Any = field(default=None, repr=False)
    precision: str = "fp32"
    """The precision the run trained in (``"bf16"`` or ``"fp32"``, after ``bf16_if_native``/``auto``)."""

    def inference_model(self) -> Any:
        """:attr:`model` in eval mode with every weight in fp32 (cast in place after a bf16 run): the model the final
        checkpoint loads as with ``dtype=float32``, as ``python -m eval`` and the demo load it by default."""
        if self.precision == "bf16":
            self.model.float()
        return self.model.eval()


def _load_records(config: MLLMTrainConfig, path: str, what: str) -> list:
    report = conversation_read_report()
    records = read_conversations(path, image_folder=config.image_folder, report=report)
    if report.skipped:
        logger.warning("%s data %s: %s (first: %s)", what, path, report.summary(), report.skipped[0])
    if not records:
        raise ConfigError(f"{what} data {path}: no usable conversation ({report.summary()})")
    return records


def _zero3_auto_values(hidden: int) -> dict[str, Any]:
    """transformers' sizes for ZeRO-3 buckets, from the LLM's hidden size (what ``"auto"`` means in our JSONs)."""
    return {
        "zero_optimization.reduce_bucket_size": hidden * hidden,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
    }


def _build_run(config: MLLMTrainConfig, context: Any) -> tuple[MLLMRun, Path | None, ConversationDataset | None, Any]:
    manager, resume = open_output_dir(config, context)
    precision = config.resolved_precision()
    logger.info("precision: %s (precision=%s on %s)", precision, config.precision, context.device)
    records = _load_records(config, config.train_data, "train")
    tokenizer = build_tokenizer(config, records, context, resume)
    factory = functools.partial(build_processor, config, tokenizer=tokenizer)
    ds_config = None  # filled before the model is built: under ZeRO-3 the model is built partitioned
    if config.deepspeed:
        hidden = planned_text_config(config, tokenizer).hidden_size
        ds_config = deepspeed_config(config.deepspeed, _with_precision(config, precision), context.world_size,
                                     auto_values=_zero3_auto_values(hidden))  # fmt: skip
    model, processor, base_dir = build_model(config, tokenizer, factory, context, precision, ds_config=ds_config)
    source = model_source(config, tokenizer, zero3=is_zero3(ds_config))
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model, use_reentrant=False)
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
    dataset.check_usable()  # a template / label-mask mismatch fails here, before any training (LabelMaskingError)
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
    if ds_config is not None:
        import deepspeed

        engine, run.optimizer, _, run.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        run.engine = run.module = engine
    return run, resume, val, sampler


def _with_precision(config: MLLMTrainConfig, precision: str) -> MLLMTrainConfig:
    resolved = copy.copy(config)
    resolved.precision = precision  # type: ignore[assignment]
    return resolved


def _hooks(run: MLLMRun) -> LoopHooks:
    """The MLLM parts of the loop: the language-model loss per supervised token over each optimizer step (the
    loop's ``num_items``), token counts, the log line, checkpoints."""
    context = run.context
    collate = functools.partial(collate_conversations, config=_collate_config(run))

    def terms(batch: MLLMBatch, num_items_in_batch: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The sum of the batch's token losses (fp32: the model's ``ForCausalLMLoss`` upcasts the logits) divided by
        ``num_items_in_batch``; ``loss_sum`` is that sum, for the logged per-token mean."""
        loss = forward(run, batch, use_cache=False, num_items_in_batch=num_items_in_batch).loss
        value = float(loss.detach())
        counts = {"supervised_tokens": batch.num_supervised, "tokens": batch.num_tokens, "samples": len(batch.ids)}
        return loss, {
            "loss": value,
            "loss_sum": value * num_items_in_batch,
            **{key: float(number) for key, number in counts.items()},
        }

    def log_fields(interval: dict[str, float], count: int, seconds: float) -> dict[str, Any]:
        names = ("loss_sum", "supervised_tokens", "tokens", "samples")
        sums = context.reduce({key: interval[key] for key in names}, op="sum")
        return {
            "loss": sums["loss_sum"] / max(sums["supervised_tokens"], 1.0),  # per supervised token, all ranks
            "supervised_tokens": int(sums["supervised_tokens"]),
            "tokens_per_s": sums["tokens"] / max(seconds, 1e-9),
            "samples_per_s": sums["samples"] / max(seconds, 1e-9),
        }

    return LoopHooks(
        terms=terms,
        mean_terms=("loss",),
        log_fields=log_fields,
        save=lambda state: save_mllm_checkpoint(run, state),
        collate=collate,
        desc=f"mllm stage {run.config.stage}",
        num_items=lambda batch: batch.num_supervised,
    )


def train_mllm(
    config: MLLMTrainConfig, step_callback: Callable[[MLLMTrainerState], None] | None = None
) -> MLLMTrainResult:
    """Train as ``config`` says (stage 1 or 2); resumable, distributed when launched so.

    ``step_callback(state)`` runs after every optimizer step (and its logging / checkpointing).
    """
    config.validate()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    with distributed_session(config.device, use_deepspeed=bool(config.deepspeed)) as context:
        run, resume, val, sampler = _build_run(config, context)
        state = MLLMTrainerState()
        if resume is not None:
            state = load_mllm_checkpoint(run, resume)
            logger.info("resumed from %s at step %d", resume, state.step)
        hooks = _hooks(run)
        batches = start_run(run, state, resume, sampler, hooks, find_unused_parameters=config.tune_vision_tower)

        def after_step(current: MLLMTrainerState) -> None:
            _check_invalid(run, current)
            if step_callback is not None:
                step_callback(current)

        outcome = run_loop(run, state, batches, sampler, hooks, val_dataset=val, start=start, step_callback=after_step)
        projector = Path(config.output_dir) / MM_PROJECTOR_FILE
        if context.is_main:
            tmp = projector.with_suffix(".tmp")
            shutil.copyfile(outcome.checkpoint / MM_PROJECTOR_FILE, tmp)
            os.replace(tmp, projector)
        context.barrier()
        return MLLMTrainResult(
            stage=config.stage,
            step=state.step,
            max_steps=run.max_steps,
            epoch=state.epoch,
            metrics=outcome.metrics,
            val_metrics=outcome.val_metrics,
            checkpoint=outcome.checkpoint,
            mm_projector=projector,
            output_dir=Path(config.output_dir),
            stop_reason=outcome.stop_reason,
            skipped_images=state.flush_skipped(context)["skipped_images"],
            skipped_too_long=state.skipped_too_long,
            skipped_invalid=state.skipped_invalid,
            trainable_parameters=dict(run.trainable_counts),
            elapsed_s=time.perf_counter() - start,
            log_history=list(state.log_history),
            model=run.model,
            processor=run.processor,
            precision=run.precision,
        )


def _check_invalid(run: MLLMRun, state: MLLMTrainerState) -> None:
    """Raise :class:`TooManyInvalidSamples` on every rank when more than ``max_invalid_fraction`` of the training
    samples were invalid (collective: the skip counts are summed over ranks after every step)."""
    context, config = run.context, run.config
    totals = state.flush_skipped(context)
    drawn = state.micro_batches * config.batch_size * context.world_size + sum(totals.values())

    def examples() -> list[str]:
        if not context.distributed:
            return list(state.pending_invalid_examples)
        gathered: list[list[str] | None] = [None] * context.world_size
        torch.distributed.all_gather_object(gathered, state.pending_invalid_examples)
        return [reason for rank in gathered for reason in rank or []]

    check_invalid_budget(state.skipped_invalid, drawn, len(run.dataset), config.max_invalid_fraction, examples)


def _collate_config(run: MLLMRun) -> CollateConfig:
    model_config = unwrap(run.model).config
    return CollateConfig(
        pad_token_id=run.tokenizer.pad_token_id,
        image_token_id=model_config.image_token_id,
        region_token_id=model_config.region_token_id,
        image_seq_length=model_config.image_seq_length,
        image_size=model_config.vision_config.vision_config.image_size,
    )


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
    except TooManyInvalidSamples as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if rank == "0":
        print(f"done: stage {result.stage}, step {result.step}/{result.max_steps} ({result.stop_reason}), "
              f"loss {result.metrics.get('loss')}, checkpoint {result.checkpoint}, projector {result.mm_projector}, "
              f"{result.skipped_images} images skipped, {result.skipped_too_long} samples too long, "
              f"{result.skipped_invalid} invalid samples skipped")  # fmt: skip
    return 0


__all__ = ["MLLMTrainResult", "main", "train_mllm"]


if __name__ == "__main__":
    sys.exit(main())
