"""Configuration of MLLM training (stage 1 alignment, stage 2 instruction tuning): one flat dataclass.

Loaded like the CLOC pretraining config (:mod:`train.config`): YAML plus ``key=value`` overrides,
dotted keys into mappings (``model_overrides.text_config.num_hidden_layers=4``), values converted to the field's
type, unknown keys refused with a suggestion.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cloc_encoder.distributed import has_native_bf16, resolve_device
from cloc_encoder.run_folder import resolve_model_folder
from train.config import ConfigError, load_train_config

STAGE_DEFAULT_LR = {1: 1e-3, 2: 2e-5}
"""LLaVA-1.5's recipe: stage 1 (projector) 1e-3, stage 2 (full fine-tune) 2e-5."""
LORA_DEFAULT_LR = 2e-4
LORA_DEFAULT_PROJECTOR_LR = 2e-5
"""LLaVA-1.5's LoRA recipe: 2e-4 for the adapters, 2e-5 for the projector."""


@dataclass
class MLLMTrainConfig:
    """Everything an MLLM training run needs. ``batch_size`` is per process and per micro-batch.

    Stage 1 trains the image and region projectors (plus the prompter / ViT when ``tune_*`` asks; they travel to
    stage 2 in ``mm_projector.safetensors``). Stage 2 trains the language model (full, LoRA, or QLoRA
    with ``bits``) and the projectors, plus the prompter (``tune_prompter``) and the ViT (``tune_vision_tower``)
    when asked. The model comes from ``model_path`` (a CLOC-LLaVA folder), or is assembled from ``vision_tower``
    (a CLOC encoder folder) and ``language_model`` (a causal-LM folder); a part that is not given is the tiny one
    of :mod:`mllm.tiny`, initialised from ``init_seed`` (tests, the synthetic world).
    """

    stage: int = 1
    """1: projectors only (alignment); 2: LLM + projectors (instruction tuning)."""

    # data
    train_data: str = ""
    """Conversation data: a LLaVA JSON list, a JSONL file, or a folder of them (``docs/training_mllm.md``)."""
    val_data: str | None = None
    image_folder: str | None = None
    """Where relative image paths start (default: each data file's folder)."""
    max_length: int = 2048
    """Token cap per sample (``<image>`` expanded); longer samples are cut or skipped and counted."""
    group_by_length: bool = True
    """Batch samples of similar length together (less padding); deterministic and resumable."""
    assistant_mask: Literal["generation", "prefix"] = "generation"
    """Which tokens carry the loss: the template's ``{% generation %}`` blocks, or each reply found by rendering the
    prompt before it (for templates without generation blocks)."""
    chat_template: str | None = None
    """``null``: the tokenizer's template (Vicuna v1 when it has none); a name in
    :data:`mllm.chat_template.CHAT_TEMPLATES` (``vicuna_v1``, ``instruction_first``); or a path to a Jinja file."""
    resize_mode: Literal["pad", "squash", "crop"] | None = None
    """Image resizing (``null``: the saved image processor's, else ``pad``)."""
    num_workers: int = 0
    max_invalid_fraction: float = 0.01
    """Invalid samples (a label mask that cannot be built, a record the processor rejects) are skipped and counted;
    more than this fraction of the data set (or of the samples drawn, when more) stops the run with an error."""

    # model
    model_path: str | None = None
    """A CLOC-LLaVA checkpoint folder (everything loaded from it)."""
    vision_tower: str | None = None
    """A CLOC encoder checkpoint folder (ViT + prompter); absent: the tiny tower from config."""
    language_model: str | None = None
    """A causal-LM checkpoint folder (weights and tokenizer); absent: the tiny Llama from config."""
    tokenizer: str | None = None
    """A tokenizer folder. Absent: the resumed checkpoint's, the model's, the stage-1 folder's, the LLM's, or a BPE
    trained on the training texts (tiny LLM only)."""
    tokenizer_vocab_size: int = 512
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """CLOCLlavaConfig fields (``projector_type``, ``vision_feature_layer``, ``box_codec``, ...); with a tiny part
    also ``vision_config`` / ``text_config`` overrides of it."""
    init_seed: int = 0
    """Seed of every newly initialised weight (projectors, tiny towers), so stage 2 rebuilds stage 1's base."""
    pretrain_mm_projector: str | None = None
    """Stage 1's ``mm_projector.safetensors`` (or a folder holding it) to start from: LLaVA's
    ``pretrain_mm_mlp_adapter``, plus the vision-tower parts stage 1 tuned (loaded on top of ``vision_tower``)."""
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False

    # what to train
    tune_prompter: bool = False
    tune_vision_tower: bool = False
    lora: bool = False
    """Stage 2: LoRA adapters on the LLM's linear layers instead of full fine-tuning."""
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_target_modules: str | None = None
    """Comma-separated module-name suffixes (``q_proj,v_proj``); default every linear layer of the LLM."""
    bits: int | None = None
    """4 or 8: QLoRA (bitsandbytes and a CUDA GPU required; needs ``lora``)."""

    # optimisation
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    lr: float | None = None
    """Peak lr; default by stage (1e-3 / 2e-5, LoRA 2e-4)."""
    projector_lr: float | None = None
    """Peak lr of both projectors (default ``lr``; with LoRA 2e-5)."""
    vision_tower_lr: float | None = None
    """Peak lr of the ViT and prompter when tuned (default ``lr``)."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    optimizer: Literal["adamw", "cpu_adam"] = "adamw"
    """``adamw``: torch AdamW; ``cpu_adam``: DeepSpeed's CPU Adam (for ZeRO optimizer offload on GPUs; JIT-built)."""
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    """Overrides ``warmup_ratio`` when set."""
    min_lr_ratio: float = 0.0
    num_epochs: float = 1.0
    max_steps: int | None = None
    """Overrides ``num_epochs`` when set."""
    max_minutes: float | None = None
    grad_clip: float | None = 1.0
    seed: int = 0

    # logging and checkpoints
    output_dir: str = "runs/mllm"
    log_every: int = 10
    eval_every: int = 0
    val_max_batches: int | None = None
    save_every: int = 500
    keep_last: int = 2
    resume: bool = False
    resume_from: str | None = None
    tensorboard: bool = True
    progress_bar: bool = True

    # runtime
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "bf16_if_native"] = "auto"
    """``auto``: bf16 on a GPU that supports it, else fp32; ``bf16_if_native``: bf16 on any device that computes it
    in hardware (such a GPU, or a CPU with AMX / AVX512-BF16: bf16 autocast, the frozen parts held in bf16), else
    fp32 (the tiny recipe's: its stage 2 is 1.2-1.5x as fast on an AMX CPU, docs/benchmarks.md)."""
    deepspeed: str | None = None
    """A DeepSpeed JSON config (``train/deepspeed/zero2.json``, ``zero3.json``, ``zero3_offload.json``)."""

    def validate(self) -> MLLMTrainConfig:
        """Check values that types alone do not; returns ``self``. A training run's ``output_dir`` given as
        ``model_path`` or ``vision_tower`` is replaced by its latest checkpoint folder (what the run then records)."""
        if self.stage not in (1, 2):
            raise ConfigError(f"config key 'stage' must be 1 or 2, got {self.stage}")
        if not self.train_data:
            raise ConfigError("config key 'train_data' is required (conversation JSON/JSONL file or folder)")
        for key in ("batch_size", "gradient_accumulation_steps", "log_every", "keep_last", "max_length", "lora_r"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every", "save_every", "num_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key {key!r} must be >= 0, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"config key 'max_steps' must be >= 1, got {self.max_steps}")
        if self.num_epochs <= 0:
            raise ConfigError(f"config key 'num_epochs' must be > 0, got {self.num_epochs}")
        for key in ("lr", "projector_lr", "vision_tower_lr", "max_minutes"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"config key {key!r} must be > 0, got {value}")
        if not 0.0 <= self.max_invalid_fraction <= 1.0:
            raise ConfigError(f"config key 'max_invalid_fraction' must be in 0..1, got {self.max_invalid_fraction}")
        if not 0.0 <= self.warmup_ratio < 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("config keys 'warmup_ratio' (0..1) / 'min_lr_ratio' (0..1) out of range")
        if self.model_path and (self.vision_tower or self.language_model):
            raise ConfigError("give either model_path (a CLOC-LLaVA folder) or vision_tower/language_model, not both")
        if self.stage == 1 and (self.lora or self.bits):
            raise ConfigError("stage 1 trains the projectors only; lora and bits are for stage 2")
        if self.bits is not None:
            if self.bits not in (4, 8):
                raise ConfigError(f"config key 'bits' must be 4 or 8 (QLoRA), got {self.bits}")
            if not self.lora:
                raise ConfigError("bits=4/8 quantises the frozen LLM for QLoRA: set lora=true as well")
        for key in ("model_path", "vision_tower"):
            if getattr(self, key):
                setattr(self, key, str(resolve_model_folder(getattr(self, key))))
        return self

    def resolved_precision(self) -> str:
        """``"bf16"`` or ``"fp32"`` (``auto``: bf16 on a CUDA GPU that supports it; ``bf16_if_native``: bf16 on
        the training device when it has bf16 units, :func:`~cloc_encoder.distributed.has_native_bf16`)."""
        if self.precision in ("fp32", "bf16"):
            return self.precision
        device = resolve_device(self.device)
        if self.precision == "auto" and device.type != "cuda":
            return "fp32"
        return "bf16" if has_native_bf16(device) else "fp32"

    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return LORA_DEFAULT_LR if self.stage == 2 and self.lora else STAGE_DEFAULT_LR[self.stage]

    def peak_projector_lr(self) -> float:
        if self.projector_lr is not None:
            return self.projector_lr
        return LORA_DEFAULT_PROJECTOR_LR if self.stage == 2 and self.lora and self.lr is None else self.peak_lr()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    def save_yaml(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


def load_mllm_config(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()) -> MLLMTrainConfig:
    """Read a YAML config (optional) and apply ``key=value`` overrides. Does not call ``validate``."""
    return load_train_config(path, overrides, MLLMTrainConfig)


__all__ = ["LORA_DEFAULT_LR", "STAGE_DEFAULT_LR", "MLLMTrainConfig", "load_mllm_config"]
