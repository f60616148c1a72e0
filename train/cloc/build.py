"""Build the pieces of a CLOC pretraining run from its config: tokenizer, model, optimizer, lr schedule."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from cloc_encoder import CLOCConfig, CLOCModel
from cloc_encoder.data.format import RegionTextRecord
from cloc_encoder.distributed import DistributedContext
from cloc_encoder.factory import build_cloc_model, load_from_clip, preset_config
from cloc_encoder.tokenization import train_caption_tokenizer
from mllm.loading import resolve_attn_implementation
from train.cloc.config import CLOCTrainConfig
from train.config import ConfigError
from train.schedule import lr_factor

logger = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
SUB_CONFIGS = ("vision_config", "text_config")


def check_model_overrides(overrides: dict[str, Any], reference: CLOCConfig) -> None:
    """Raise a :class:`ConfigError` naming any ``model_overrides`` key that ``CLOCConfig`` does not have."""
    known = set(CLOCConfig.__annotations__) | set(reference.to_dict())
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(f"unknown config key 'model_overrides.{key}' (not a CLOCConfig field)")
        if key in SUB_CONFIGS:
            if not isinstance(value, dict):
                raise ConfigError(f"config key 'model_overrides.{key}' must be a mapping")
            sub_known = set(getattr(reference, key).to_dict())
            for sub_key in value:
                if sub_key not in sub_known:
                    raise ConfigError(f"unknown config key 'model_overrides.{key}.{sub_key}'")


def training_texts(records: Iterable[RegionTextRecord]) -> list[str]:
    """Every caption, region caption and referring expression (the tokenizer's training corpus)."""
    texts = []
    for record in records:
        texts.append(record.caption)
        for region in record.regions:
            texts.append(region.caption)
            texts.extend(region.expressions)
    return [text for text in texts if text]


def _text_positions(config: CLOCTrainConfig) -> int:
    overrides = copy.deepcopy(config.model_overrides)
    return int(preset_config(config.preset, **overrides).text_config.max_position_embeddings)


def build_tokenizer(
    config: CLOCTrainConfig,
    records: Iterable[RegionTextRecord],
    context: DistributedContext,
    resume_dir: Path | None = None,
) -> PreTrainedTokenizerBase:
    """The run's tokenizer, in this order: the resumed checkpoint's, ``config.tokenizer``, the one in
    ``init_from``, the one saved in ``output_dir/tokenizer`` by an earlier start, or a BPE trained on the training
    texts (by rank 0, saved to ``output_dir/tokenizer`` and loaded from there by every rank). ``records`` is only
    iterated in that last case (it may be a lazy stream)."""
    if resume_dir is not None and (resume_dir / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(resume_dir)
    if config.tokenizer:
        return AutoTokenizer.from_pretrained(config.tokenizer)
    if config.init_from:
        try:
            return AutoTokenizer.from_pretrained(config.init_from)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"init_from={config.init_from!r} holds no tokenizer ({error}); pass tokenizer=<local folder>"
            ) from error
    saved = Path(config.output_dir) / TOKENIZER_DIR
    if context.is_main and not (saved / "tokenizer_config.json").exists():
        length = config.max_text_length or _text_positions(config)
        logger.info("training a %d-token BPE tokenizer on the training texts", config.tokenizer_vocab_size)
        tokenizer = train_caption_tokenizer(training_texts(records), config.tokenizer_vocab_size, length)
        tokenizer.save_pretrained(saved)
    context.barrier()
    return AutoTokenizer.from_pretrained(saved)


def build_model(config: CLOCTrainConfig, tokenizer: PreTrainedTokenizerBase) -> CLOCModel:
    """A CLOC encoder from ``init_from`` (CLIP/SigLIP or CLOC folder) or from ``preset``, with ``model_overrides``.

    ``config.max_regions_per_image`` is written into the model config (the grounding loss divides by ``4·M·N``).
    """
    overrides = copy.deepcopy(config.model_overrides)
    torch.manual_seed(config.seed)
    if config.init_from:
        kind = AutoConfig.from_pretrained(config.init_from).model_type
        if kind == CLOCConfig.model_type:
            if any(key in overrides for key in SUB_CONFIGS):
                raise ConfigError("model_overrides cannot change the towers of a CLOC checkpoint (init_from)")
            model = CLOCModel.from_pretrained(config.init_from, **overrides)
        else:
            model = load_from_clip(config.init_from, **overrides)
        check_model_overrides(overrides, model.config)
    else:
        check_model_overrides(overrides, preset_config(config.preset))
        model = build_cloc_model(config.preset, tokenizer, **overrides)
    model.config.max_regions_per_image = config.max_regions_per_image
    model.set_attn_implementation(resolve_attn_implementation(config.attn_implementation))
    vocab = model.config.text_config.vocab_size
    if len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the text tower's vocab_size is {vocab}")
    return model


def text_length(config: CLOCTrainConfig, model: CLOCModel) -> int:
    """Fixed token length of every caption (so image and region captions share one text-tower pass)."""
    positions = int(model.config.text_config.max_position_embeddings)
    length = config.max_text_length or positions
    if length > positions:
        raise ConfigError(f"max_text_length={length} exceeds the text tower's {positions} positions")
    return length


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (``ndim >= 2``) only; biases, norms, scales and class tokens are not decayed."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: CLOCTrainConfig) -> torch.optim.AdamW:
    """torch AdamW (no DeepSpeed CPU-Adam build needed), betas and decay from the config."""
    return torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.lr, betas=config.betas, eps=config.eps
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: CLOCTrainConfig) -> LambdaLR:
    return LambdaLR(optimizer, lr_factor(config.warmup_steps, config.max_steps, config.min_lr_ratio))


__all__ = [
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "build_tokenizer",
    "check_model_overrides",
    "parameter_groups",
    "text_length",
    "training_texts",
]
