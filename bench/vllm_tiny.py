"""A tiny CLOC-LLaVA that vLLM's CPU backend can serve, and the chat requests sent to it: the model, the request
cases (0, 1 and 3 regions) and the OpenAI ``messages`` / ``extra_body`` a client sends for each. Used by
``tests/vllm`` and ``bench/serve_throughput.py``.

vLLM's CPU attention refuses ``head_dim`` 16, so the language model here is 2 layers × 256 wide with 4 heads
(``head_dim`` 64), unlike :func:`mllm.tiny.tiny_config`'s default 64-wide one. Everything else is the tiny config.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

TINY_VLLM_TEXT_CONFIG = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "initializer_range": 0.2,
}
"""Overrides of :func:`mllm.tiny.tiny_config`'s language model: ``head_dim`` 64 (vLLM's CPU attention needs it)."""


def save_tiny_vllm_model(
    folder: Path, seed: int = 0, chat_template: str = "vicuna_v1", image_token_merge: int = 1
) -> Path:
    """Save a tiny random CLOC-LLaVA (``head_dim`` 64) and its processor to ``folder``; ``chat_template`` names one
    of :data:`mllm.chat_template.CHAT_TEMPLATES` (``instruction_first``: the image after the question, as the
    synthetic-world recipe trains), ``image_token_merge`` is the config's (2: 2 × 2 patches per image token)."""
    from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
    from mllm.chat_template import CHAT_TEMPLATES
    from mllm.tiny import TINY_CORPUS, tiny_config
    from mllm.tokenization import train_chat_tokenizer

    tokenizer = train_chat_tokenizer(TINY_CORPUS, vocab_size=320)
    torch.manual_seed(seed)
    config = tiny_config(tokenizer, text_config=dict(TINY_VLLM_TEXT_CONFIG), image_token_merge=image_token_merge)
    model = CLOCLlavaForConditionalGeneration._from_config(config).eval()
    model.save_pretrained(folder)
    processor = CLOCLlavaProcessor.from_model_config(config, tokenizer, chat_template=CHAT_TEMPLATES[chat_template])
    processor.save_pretrained(folder)
    return folder


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """A random RGB image (non-square sizes exercise the processor's padding and the box mapping)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class ChatCase:
    """One chat request: an image, a user message that refers to regions as ``[regionK]``, and the regions.
    ``history`` holds earlier turns as ``(user message, its regions, assistant answer)`` (offline prompts only)."""

    name: str
    image_size: tuple[int, int]
    image_seed: int
    message: str
    regions: list[list[float]] = field(default_factory=list)
    history: list[tuple[str, list[list[float]], str]] = field(default_factory=list)

    @property
    def image(self) -> Image.Image:
        return noise_image(*self.image_size, self.image_seed)


CASES = [
    ChatCase("no_region", (64, 48), 1, "Where is the red circle?"),
    ChatCase("one_region", (48, 64), 2, "What is [region0]?", [[0.1, 0.2, 0.6, 0.7]]),
    ChatCase(
        "three_regions",
        (80, 40),
        3,
        "Is [region0] left of [region1]? And what is [region2]?",
        [[0.05, 0.1, 0.4, 0.5], [0.5, 0.05, 0.95, 0.6], [0.2, 0.55, 0.8, 0.98]],
    ),
    ChatCase("one_region_square", (32, 32), 4, "Describe [region0] briefly.", [[0.0, 0.0, 0.5, 0.5]]),
]
"""Requests with 0, 1 and 3 regions on images of several aspect ratios."""


def messages(case: ChatCase, with_image: bool = True) -> list[dict[str, Any]]:
    """The OpenAI chat ``messages`` of a case: one user turn, the image as a PNG data URI, then the text."""
    if case.history:
        raise ValueError(f"case {case.name}: messages() sends one user turn; this case has earlier turns")
    content: list[dict[str, Any]] = [{"type": "text", "text": case.message}]
    if with_image:
        content.insert(0, {"type": "image_url", "image_url": {"url": png_data_uri(case.image)}})
    return [{"role": "user", "content": content}]


def extra_body(regions: list[list[float]]) -> dict[str, Any]:
    """What a client adds for CLOC-LLaVA (docs/serving.md): the regions, and the BOS token the chat template omits."""
    return {"mm_processor_kwargs": {"regions": regions}, "add_special_tokens": True}
