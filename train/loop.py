"""The training loop both trainers run: gradient accumulation, optimizer steps, logging, validation, checkpoints,
time limits and the progress bar. A trainer supplies its model-specific parts as :class:`LoopHooks`.

``SIGTERM`` (a scheduler's preemption or ``kill``) does not lose work: the loop finishes the current step, writes
a checkpoint and returns with ``stop_reason="SIGTERM"``; run again with ``--resume`` to continue exactly.

A step's *terms* are the numbers a micro-batch reports (losses, token counts, ...). Terms named in
``LoopHooks.mean_terms`` are averaged over the step's micro-batches; the others are summed. Between two log lines
the loop sums every term over the steps; ``lr`` and ``grad_norm`` keep their latest value.

With ``LoopHooks.num_items`` the loss is averaged per *item* (the MLLM's supervised tokens) over the whole optimizer
step, as transformers' Trainer does with ``num_items_in_batch``: the loop loads the step's micro-batches first,
counts their items and sums the count over ranks (``N``); each micro-batch's loss is the sum of its item losses
divided by ``N``, so the step's gradient is that of the mean over all its items however they fall into micro-batches
and ranks. DDP and DeepSpeed average gradients over ranks, so the loss is multiplied by the world size before the
backward pass, and DeepSpeed's own ``1 / gradient_accumulation_steps`` is turned off (``scale_wrt_gas=False``).
Every term is then summed over micro-batches (the loss term summed over micro-batches and ranks is the step's mean
per item).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cloc_encoder.distributed import DistributedContext, init_distributed
from train.metrics import MetricsLogger
from train.samplers import BatchSchedule, EvalBatchSampler, ResumableBatchSampler
from train.trainer_state import Run, TrainerState, record_validation

logger = logging.getLogger(__name__)
LATEST_VALUE_TERMS = ("lr", "grad_norm")


@dataclass
class LoopHooks:
    """The trainer-specific parts of the loop.

    Attributes:
        terms: ``batch -> (loss, terms)``: runs the model on one micro-batch (through :func:`forward`); ``loss``
            is what is back-propagated, ``terms`` plain floats. With ``num_items`` it is called as
            ``terms(batch, num_items_in_batch=n)`` and ``loss`` must be the sum of the batch's item losses (reduced
            in fp32) divided by ``n``.
        mean_terms: names of the terms averaged over micro-batches (and over validation batches; weighted by items
            with ``num_items``).
        log_fields: ``(interval_sums, steps, seconds) -> fields`` of a log line (collective: may reduce).
        save: ``state -> checkpoint folder`` (collective).
        collate: the collate function of the training and validation loaders.
        after_optimizer_step: runs after each optimizer step taken by the loop (not under DeepSpeed).
        desc: the progress bar's label.
        num_items: ``batch -> items``: the loss items of a micro-batch (supervised tokens); set, the loss is a mean
            per item over the optimizer step (see the module docstring). ``None``: a mean per micro-batch.
    """

    terms: Callable[..., tuple[torch.Tensor, dict[str, float]]]
    mean_terms: Sequence[str]
    log_fields: Callable[[dict[str, float], int, float], dict[str, Any]]
    save: Callable[[TrainerState], Path]
    collate: Callable[[Sequence[Any]], Any]
    after_optimizer_step: Callable[[], None] | None = None
    desc: str = "train"
    num_items: Callable[[Any], int] | None = None


@dataclass
class LoopOutcome:
    """How :func:`run_loop` ended: the last log line, the last validation record, the final checkpoint."""

    metrics: dict[str, Any]
    val_metrics: dict[str, Any] | None
    checkpoint: Path
    stop_reason: str


class _TerminationRequest:
    """Records a ``SIGTERM`` while installed (main thread only; elsewhere signals keep their handlers)."""

    def __init__(self) -> None:
        self.received: str | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        logger.warning("%s received: stopping after this step and writing a checkpoint", self.received)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_TerminationRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def distributed_session(device: str, use_deepspeed: bool) -> Iterator[DistributedContext]:
    """The process group for one training call (started here when the launcher asked for one, closed at exit)."""
    context = init_distributed(device, use_deepspeed=use_deepspeed)
    try:
        yield context
    finally:
        context.shutdown()


def forward(run: Run, batch: Any, **kwargs: Any) -> Any:
    """``run.module`` on ``batch`` moved to the device: bf16 inputs under a bf16 DeepSpeed engine, autocast for
    bf16 without one, plain fp32 otherwise."""
    bf16 = run.precision == "bf16"
    inputs = batch.to(run.context.device, torch.bfloat16 if run.engine is not None and bf16 else None).inputs
    autocast = (
        torch.autocast(run.context.device.type, dtype=torch.bfloat16)
        if run.engine is None and bf16
        else contextlib.nullcontext()
    )
    with autocast:
        return run.module(**inputs, **kwargs)


def step_items(run: Run, micro_batches: Sequence[Any], count: Callable[[Any], int]) -> float:
    """The loss items of a whole optimizer step: ``count`` summed over its micro-batches and over ranks (collective;
    at least 1, so a step without items back-propagates zeros)."""
    local = sum(count(batch) for batch in micro_batches)
    return max(1.0, run.context.reduce({"items": float(local)}, op="sum")["items"])


def _backward(run: Run, loss: torch.Tensor, hooks: LoopHooks) -> None:
    """Back-propagate one micro-batch's ``loss`` (and let DeepSpeed step, which it only does at the boundary).

    Per-item losses are already divided by the step's items over all ranks; DDP and DeepSpeed average gradients over
    ranks, hence the factor ``world_size``. Per-batch means are divided by the accumulation steps (by DeepSpeed
    itself under DeepSpeed)."""
    if hooks.num_items is not None:
        scaled = loss * run.context.world_size
        if run.engine is not None:
            run.engine.backward(scaled, scale_wrt_gas=False)
        else:
            scaled.backward()
    elif run.engine is not None:
        run.engine.backward(loss)
    else:
        (loss / run.config.gradient_accumulation_steps).backward()
    if run.engine is not None:
        run.engine.step()


def train_step(run: Run, batches: Iterator[Any], state: TrainerState, hooks: LoopHooks) -> dict[str, float]:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns the step's terms."""
    accumulation = run.config.gradient_accumulation_steps
    sums: dict[str, float] = {}
    lr = run.engine.get_lr()[0] if run.engine is not None else run.optimizer.param_groups[0]["lr"]
    per_item = hooks.num_items is not None
    micro_batches, options = batches, {}
    if hooks.num_items is not None:  # the step's items are counted before its first backward pass
        loaded = [next(batches) for _ in range(accumulation)]
        micro_batches, options = iter(loaded), {"num_items_in_batch": step_items(run, loaded, hooks.num_items)}
    for micro in range(accumulation):
        batch = next(micro_batches)
        state.note_batch(batch)
        last = micro == accumulation - 1
        sync = contextlib.nullcontext() if last or run.ddp is None else run.ddp.no_sync()
        with sync:
            loss, terms = hooks.terms(batch, **options)
            _backward(run, loss, hooks)
        for key, value in terms.items():
            mean = key in hooks.mean_terms and not per_item
            sums[key] = sums.get(key, 0.0) + (value / accumulation if mean else value)
    if run.engine is not None:
        grad_norm = run.engine.get_global_grad_norm()
    else:
        grad_norm = None
        if run.config.grad_clip:
            trainable = [p for p in run.model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, run.config.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if hooks.after_optimizer_step is not None:
            hooks.after_optimizer_step()
    state.step += 1
    state.micro_batches += accumulation
    sums["lr"] = float(lr)
    if grad_norm is not None:
        sums["grad_norm"] = float(grad_norm)
    return sums


@torch.no_grad()
def evaluate(run: Run, dataset: Any, hooks: LoopHooks) -> dict[str, float]:
    """``val_<term>``: each mean term averaged over the validation set (at most ``val_max_batches`` batches per
    rank) and over ranks — per item with ``hooks.num_items``; empty when the set is smaller than one global batch."""
    context, config = run.context, run.config
    sampler = EvalBatchSampler(
        len(dataset), config.batch_size, rank=context.rank, world_size=context.world_size,
        max_batches=config.val_max_batches,
    )  # fmt: skip
    if len(sampler) == 0:
        logger.warning("validation set smaller than one global batch; skipped")
        return {}
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=hooks.collate, num_workers=config.num_workers)
    run.module.eval()
    if hooks.num_items is not None:
        means = _per_item_means(run, loader, hooks, hooks.num_items)
        run.module.train()
        return {f"val_{key}": value for key, value in means.items()}
    sums = dict.fromkeys(hooks.mean_terms, 0.0)
    for batch in loader:
        _, terms = hooks.terms(batch)
        for key in hooks.mean_terms:
            sums[key] += terms[key] / len(sampler)
    run.module.train()
    return {f"val_{key}": value for key, value in context.reduce(sums).items()}


def _per_item_means(
    run: Run, loader: Iterable[Any], hooks: LoopHooks, num_items: Callable[[Any], int]
) -> dict[str, float]:
    """Each mean term averaged per item (``num_items``) over ``loader`` and over ranks (collective)."""
    sums = {f"term:{key}": 0.0 for key in hooks.mean_terms}
    items = 0
    for batch in loader:
        count = num_items(batch)
        _, terms = hooks.terms(batch, num_items_in_batch=max(count, 1))
        for key in hooks.mean_terms:
            sums[f"term:{key}"] += terms[key] * count
        items += count
    totals = run.context.reduce({**sums, "items": float(items)}, op="sum")
    return {key: totals[f"term:{key}"] / max(totals["items"], 1.0) for key in hooks.mean_terms}


def start_run(
    run: Run,
    state: TrainerState,
    resume: Path | None,
    sampler: ResumableBatchSampler | BatchSchedule,
    hooks: LoopHooks,
    *,
    find_unused_parameters: bool = False,
) -> Iterator[Any]:
    """Wrap the model in DDP when distributed without DeepSpeed, tidy ``output_dir``, and return the batches from
    ``state``'s position (with the RNG restored when resuming); opens ``run.metrics``.

    ``sampler`` is a :class:`ResumableBatchSampler` over ``run.dataset`` (map-style), or a :class:`BatchSchedule`
    that iterates over batches itself (streamed tar shards: :class:`train.cloc.streaming.StreamingBatches`)."""
    config, context = run.config, run.context
    if context.world_size > 1 and run.engine is None:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        run.ddp = run.module = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
        )
    if context.is_main:
        run.manager.remove_stale_tmp()
        config.save_yaml(Path(config.output_dir) / "train_config.yaml")
    sampler.start = state.micro_batches
    run.batches_per_epoch = sampler.batches_per_epoch
    if isinstance(sampler, ResumableBatchSampler):
        loader: Iterable[Any] = DataLoader(
            run.dataset, batch_sampler=sampler, collate_fn=hooks.collate, num_workers=config.num_workers,
            generator=torch.Generator().manual_seed(config.seed), persistent_workers=config.num_workers > 0,
            pin_memory=context.device.type == "cuda",
        )  # fmt: skip
    else:  # a stream that makes its own batches (train.cloc.streaming)
        loader = sampler
    batches = iter(loader)
    if resume is not None:
        run.restore_rng(resume)
    run.metrics = MetricsLogger(
        config.output_dir,
        resume_step=state.step if resume is not None else None,
        tensorboard=config.tensorboard,
        enabled=context.is_main,
    )
    return batches


def _log(run: Run, state: TrainerState, hooks: LoopHooks, interval: dict[str, float], count: int, seconds: float):
    record: dict[str, Any] = {"step": state.step, "epoch": round(state.micro_batches / run.batches_per_epoch, 4)}
    record.update(hooks.log_fields(interval, count, seconds))
    record["lr"] = interval["lr"]
    if "grad_norm" in interval:
        record["grad_norm"] = interval["grad_norm"]
    record.update(state.flush_skipped(run.context))
    state.log_history.append(record)
    run.metrics.log(record)
    return record


def run_loop(
    run: Run,
    state: TrainerState,
    batches: Iterator[Any],
    sampler: BatchSchedule,
    hooks: LoopHooks,
    *,
    val_dataset: Any = None,
    start: float,
    step_callback: Callable[[TrainerState], None] | None = None,
) -> LoopOutcome:
    """Train from ``state`` to ``run.max_steps`` (or ``config.max_minutes``), logging every ``log_every``,
    validating every ``eval_every`` and checkpointing every ``save_every`` steps; the last step is always logged,
    validated and saved, also when ``SIGTERM`` stops the run early. ``step_callback(state)`` runs after every
    step. Closes ``run.metrics``."""
    try:
        with _TerminationRequest().installed() as termination:
            return _loop(run, state, batches, sampler, hooks, val_dataset, start, step_callback, termination)
    finally:
        if run.metrics is not None:
            run.metrics.close()


def _loop(
    run: Run,
    state: TrainerState,
    batches: Iterator[Any],
    sampler: BatchSchedule,
    hooks: LoopHooks,
    val_dataset: Any,
    start: float,
    step_callback: Callable[[TrainerState], None] | None,
    termination: _TerminationRequest,
) -> LoopOutcome:
    config, context = run.config, run.context
    history = state.log_history
    last_record: dict[str, Any] = next((r for r in reversed(history) if "loss" in r), {})
    val_metrics = next((r for r in reversed(history) if "val_loss" in r and r["step"] == state.step), None)

    def validate() -> dict[str, Any]:
        return record_validation(run, state, evaluate(run, val_dataset, hooks))

    saved_step = state.step if state.step else -1
    interval: dict[str, float] = {}
    count, tick = 0, time.perf_counter()
    stop_reason = "max_steps"
    progress = tqdm(
        total=run.max_steps, initial=state.step, disable=not (context.is_main and config.progress_bar),
        desc=hooks.desc, dynamic_ncols=True,
    )  # fmt: skip
    while state.step < run.max_steps:
        terms = train_step(run, batches, state, hooks)
        state.epoch, state.position = sampler.locate(state.micro_batches)
        for key, value in terms.items():
            interval[key] = value if key in LATEST_VALUE_TERMS else interval.get(key, 0.0) + value
        count += 1
        progress.update(1)
        if not math.isfinite(terms["loss"]):
            logger.warning("non-finite loss %s at step %d", terms["loss"], state.step)
        if state.step % config.log_every == 0 or state.step == run.max_steps:
            last_record = _log(run, state, hooks, interval, count, time.perf_counter() - tick)
            progress.set_postfix(loss=f"{last_record['loss']:.4f}")
            interval, count, tick = {}, 0, time.perf_counter()
        if val_dataset is not None and config.eval_every and state.step % config.eval_every == 0:
            val_metrics = validate()
        if config.save_every and state.step % config.save_every == 0:
            hooks.save(state)
            saved_step = state.step
        if step_callback is not None:
            step_callback(state)
        over = config.max_minutes is not None and (time.perf_counter() - start) / 60.0 >= config.max_minutes
        stops = context.reduce({"minutes": float(over), "signal": float(termination.received is not None)}, op="max")
        if stops["signal"] > 0:  # any rank signalled: all stop at this step
            stop_reason = termination.received or "SIGTERM"
            break
        if stops["minutes"] > 0:
            stop_reason = "max_minutes"
            break
    progress.close()
    if count:  # stopped by max_minutes between two logging steps
        last_record = _log(run, state, hooks, interval, count, time.perf_counter() - tick)
    if val_dataset is not None and (val_metrics is None or val_metrics.get("step") != state.step):
        val_metrics = validate()
    checkpoint = run.manager.path(saved_step) if saved_step == state.step else hooks.save(state)
    return LoopOutcome(last_record, val_metrics, checkpoint, stop_reason)
