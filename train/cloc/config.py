"""Configuration of CLOC pretraining: one flat dataclass, loaded from YAML plus ``key=value`` overrides
(:mod:`train.config`: dotted keys into mappings, values converted to the field's type, unknown keys refused).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mllm.loading import ATTN_IMPLEMENTATIONS
from train.config import ConfigError, load_train_config


@dataclass
class CLOCTrainConfig:
    """Everything a CLOC pretraining run needs. ``batch_size`` is per process and per micro-batch.

    The global batch of one optimizer step is ``batch_size · world_size · gradient_accumulation_steps``; the
    contrastive losses see ``batch_size · world_size`` images (they gather across ranks, not across micro-batches).
    """

    # data
    train_data: str = ""
    """A region-text JSONL file or a folder of JSONL shards (``docs/data_format.md``, read into memory, exact
    resume), or WebDataset tar shards (streamed, :mod:`train.cloc.streaming`): a brace pattern
    (``shards/shard-{00000..00099}.tar``), a ``::``-joined list, ``http(s)://`` or ``pipe:`` URLs."""
    train_shard_sizes: str | None = None
    """Tar shards: their ``sizes.json`` (a path or URL, ``pipe:`` too); default: beside local shards."""
    shuffle_buffer: int = 1000
    """Tar shards: samples each DataLoader worker shuffles in memory (0: shard order)."""
    max_skipped_fraction: float = 0.01
    """Tar shards: a rank stops (TooManySkipsError) after more than 10 + this fraction of its samples were unusable."""
    val_data: str | None = None
    max_regions_per_image: int = 4
    """M: regions sampled per image per step (paper: 4); also written into the model config (grounding loss)."""
    resize_mode: Literal["pad", "squash", "crop"] = "pad"
    num_workers: int = 0

    # model
    preset: str = "tiny"
    """A name in ``cloc_encoder.factory.PRESETS``; ignored when ``init_from`` is set."""
    init_from: str | None = None
    """A local CLIP/SigLIP checkpoint folder (towers loaded, prompter new) or a CLOC folder (everything loaded)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """CLOCConfig fields, e.g. ``{"prompter_pool": "all", "vision_config": {"image_size": 32}}``."""
    attn_implementation: str = "sdpa"
    """The towers' attention: ``sdpa``, ``eager``, ``flash_attention_2`` (CUDA + flash_attn) or ``auto``
    (:func:`mllm.loading.resolve_attn_implementation`)."""

    # tokenizer
    tokenizer: str | None = None
    """A local tokenizer folder. Absent: the one in ``init_from``, else a BPE trained on the training texts."""
    tokenizer_vocab_size: int = 512
    max_text_length: int | None = None
    """Fixed token length of every caption (default: the text tower's ``max_position_embeddings``)."""

    # optimisation
    batch_size: int = 64
    gradient_accumulation_steps: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    max_steps: int = 1000
    max_minutes: float | None = None
    """Stop after this much wall time (checkpointing at the end) even if ``max_steps`` is not reached."""
    grad_clip: float | None = 1.0
    logit_scale_max: float | None = 4.6052
    """Clamp both logit scales to ``[0, this]`` after each step (CLIP: ln 100); not applied under DeepSpeed."""
    seed: int = 0

    # logging and checkpoints
    output_dir: str = "runs/cloc"
    log_every: int = 10
    eval_every: int = 0
    """Validation loss every N steps (0: only at the end when ``val_data`` is set)."""
    val_max_batches: int | None = None
    save_every: int = 500
    keep_last: int = 3
    resume: bool = False
    """Resume from ``output_dir``'s latest checkpoint when there is one."""
    resume_from: str | None = None
    """Resume from this checkpoint folder (a ``step-NNNNNN`` directory)."""
    tensorboard: bool = True
    progress_bar: bool = True

    # runtime
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    deepspeed: str | None = None
    """A DeepSpeed JSON config (e.g. ``train/deepspeed/zero2.json``); batch, accumulation, clipping and bf16 are
    filled in from this config at run time."""

    def validate(self) -> CLOCTrainConfig:
        """Check values that types alone do not; returns ``self``."""
        if not self.train_data:
            raise ConfigError("config key 'train_data' is required (a region-text JSONL file or folder)")
        positive = ("batch_size", "gradient_accumulation_steps", "max_steps", "log_every", "keep_last")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        for key in (
            "warmup_steps",
            "eval_every",
            "save_every",
            "num_workers",
            "max_regions_per_image",
            "shuffle_buffer",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key {key!r} must be >= 0, got {getattr(self, key)}")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"config keys 'lr' (> 0) / 'min_lr_ratio' (0..1) invalid: {self.lr}, {self.min_lr_ratio}")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ConfigError(f"config key 'max_skipped_fraction' must be in [0, 1], got {self.max_skipped_fraction}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"config key 'max_minutes' must be > 0, got {self.max_minutes}")
        if self.attn_implementation not in (*ATTN_IMPLEMENTATIONS, "auto"):
            raise ConfigError(
                f"config key 'attn_implementation' must be one of {(*ATTN_IMPLEMENTATIONS, 'auto')}, "
                f"got {self.attn_implementation!r}"
            )
        if self.max_text_length is not None and self.max_text_length < 2:
            raise ConfigError(f"config key 'max_text_length' must be >= 2, got {self.max_text_length}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready values (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    def save_yaml(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


def load_config(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()) -> CLOCTrainConfig:
    """Read a YAML config (optional; it may name a ``base`` config) and apply ``key=value`` overrides. Does not call
    ``validate``."""
    return load_train_config(path, overrides, CLOCTrainConfig)


__all__ = ["CLOCTrainConfig", "load_config"]
