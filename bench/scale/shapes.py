"""Sizes of a CLOC-LLaVA (LLaVA-1.5-7B's and a tiny one of the same layout), their configs, and the model built
from them with random weights."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LlavaConfig, PreTrainedTokenizerBase

from cloc_encoder.factory import preset_config
from mllm import CLOCLlavaConfig, CLOCLlavaForConditionalGeneration
from mllm.tiny import TINY_CORPUS
from mllm.tokenization import IMAGE_TOKEN, REGION_TOKEN, train_chat_tokenizer


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a CLOC-LLaVA: a CLOC encoder preset (:data:`cloc_encoder.factory.PRESETS`) and a Llama-shaped LLM.

    ``text_full_layers`` is the real depth (used for the parameter count); runs build fewer layers.
    """

    name: str
    cloc_preset: str
    text_hidden_size: int
    text_num_heads: int
    text_intermediate_size: int
    text_vocab_size: int
    text_full_layers: int
    text_max_positions: int = 4096
    cloc_overrides: Mapping[str, Any] = field(default_factory=dict)


LLAVA_7B_SHAPE = ModelShape(
    name="llava-1.5-7b",
    cloc_preset="vit-l-14-336",
    text_hidden_size=4096,
    text_num_heads=32,
    text_intermediate_size=11008,
    text_vocab_size=32000,
    text_full_layers=32,
)
"""CLIP ViT-L/14-336 CLOC encoder + Vicuna/Llama-7B shapes (LLaVA-1.5-7B)."""

SMOKE_SHAPE = ModelShape(
    name="smoke",
    cloc_preset="tiny",
    text_hidden_size=128,
    text_num_heads=4,
    text_intermediate_size=256,
    text_vocab_size=1024,
    text_full_layers=4,
    text_max_positions=512,
)
"""The same layout at tiny sizes (64-px images, 8-px patches → 64 image tokens): tests and ``--cpu-smoke``."""

SHAPES = {shape.name: shape for shape in (LLAVA_7B_SHAPE, SMOKE_SHAPE)}

LLAVA_1_5_7B_PUBLISHED = {"LLM": 6.74e9, "ViT": 0.30e9, "image projector": 0.02e9}
"""LLaVA-1.5-7B's part sizes as usually quoted (Vicuna-7B, CLIP ViT-L/14-336, mlp2x_gelu projector)."""


def build_tokenizer() -> PreTrainedTokenizerBase:
    """The offline byte-level BPE of :mod:`mllm.tiny` (it knows ``<image>`` and ``<region>``); its ids index the
    first rows of the larger vocabulary, which is fine for random weights."""
    return train_chat_tokenizer(TINY_CORPUS)


def cloc_llava_config(
    shape: ModelShape, text_layers: int, tokenizer: PreTrainedTokenizerBase, **overrides: Any
) -> CLOCLlavaConfig:
    """A :class:`CLOCLlavaConfig` of ``shape`` with ``text_layers`` LLM layers; special ids from ``tokenizer``.

    ``overrides`` set MLLM config fields (e.g. ``vision_feature_layer``).
    """
    if len(tokenizer) > shape.text_vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the vocabulary {shape.text_vocab_size}")
    text = {
        "model_type": "llama",
        "hidden_size": shape.text_hidden_size,
        "intermediate_size": shape.text_intermediate_size,
        "num_hidden_layers": text_layers,
        "num_attention_heads": shape.text_num_heads,
        "num_key_value_heads": shape.text_num_heads,
        "max_position_embeddings": shape.text_max_positions,
        "vocab_size": shape.text_vocab_size,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    return CLOCLlavaConfig(
        vision_config=preset_config(shape.cloc_preset, **dict(shape.cloc_overrides)),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        region_token_id=tokenizer.convert_tokens_to_ids(REGION_TOKEN),
        **overrides,
    )


def llava_hf_config(config: CLOCLlavaConfig) -> LlavaConfig:
    """transformers' :class:`LlavaConfig` at the sizes of ``config``: the same CLIP ViT, an mlp2x_gelu projector and
    the same language model (no prompter, no region projector)."""
    return LlavaConfig(
        vision_config=config.vision_config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        image_seq_length=config.image_seq_length,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=config.multimodal_projector_bias,
        tie_word_embeddings=False,
    )


def build_model(config: CLOCLlavaConfig, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0):
    """A randomly initialised :class:`CLOCLlavaForConditionalGeneration` built directly in ``dtype`` on ``device``
    (as ``from_pretrained(dtype=...)`` builds it: non-persistent buffers are created under that default dtype)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return CLOCLlavaForConditionalGeneration._from_config(config, dtype=dtype)
