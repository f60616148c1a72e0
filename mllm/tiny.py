"""Tiny CLOC-LLaVA models built from configs, for tests, benchmarks and the synthetic world (no download).

A 2-layer CLOC ViT on 32-px images with 8-px patches (16 image tokens) and a 2-layer × 64 Llama over an offline
byte-level BPE (:func:`mllm.tokenization.train_chat_tokenizer`).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from cloc_encoder.factory import preset_config
from mllm.configuration_cloc_llava import CLOCLlavaConfig
from mllm.tokenization import IMAGE_TOKEN, REGION_TOKEN

TINY_CORPUS = [
    f"USER: <image>\nWhere is the {size} {colour} {shape}? ASSISTANT: [{x}, {y}, {x + 250}, {y + 300}]</s>"
    f"USER: What is [{y}, {x}, {y + 100}, {x + 400}] <region>? ASSISTANT: A {colour} {shape}.</s>"
    for size in ("small", "large")
    for colour in ("red", "green", "blue", "yellow")
    for shape in ("circle", "square", "triangle")
    for x, y in ((12, 340), (505, 67), (699, 101))
]
"""Texts to train the tiny tokenizer on: chat turns, box text on the 0–999 grid, colours and shapes."""


def tiny_config(tokenizer: PreTrainedTokenizerBase, **overrides: Any) -> CLOCLlavaConfig:
    """A tiny :class:`CLOCLlavaConfig` whose vocabulary and special ids match ``tokenizer``.

    ``overrides`` set MLLM fields; ``vision_config`` / ``text_config`` dicts update the tiny towers.
    """
    vision = {"num_hidden_layers": 2, "image_size": 32, "patch_size": 8, "hidden_size": 64, "intermediate_size": 128}
    vision.update(overrides.pop("vision_config", {}) or {})
    cloc_text = {
        "num_hidden_layers": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "max_position_embeddings": 16,
        "vocab_size": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    cloc = preset_config("tiny", vision_config=vision, text_config=cloc_text, projection_dim=32)
    text = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text.update(overrides.pop("text_config", {}) or {})
    values = {
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "region_token_id": tokenizer.convert_tokens_to_ids(REGION_TOKEN),
        **overrides,
    }
    return CLOCLlavaConfig(vision_config=cloc, text_config=text, **values)


__all__ = ["TINY_CORPUS", "tiny_config"]
