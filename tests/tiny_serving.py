"""A tiny random CLOC-LLaVA saved to a folder, for the serving tests (no download, a second to build)."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
from mllm.tiny import tiny_config


def save_tiny_chat_model(tokenizer, folder: Path) -> Path:
    """Save a tiny random CLOC-LLaVA and its processor to ``folder`` (a ``save_pretrained`` folder)."""
    torch.manual_seed(0)
    config = tiny_config(tokenizer, text_config={"initializer_range": 0.2})
    model = CLOCLlavaForConditionalGeneration._from_config(config).eval()
    model.save_pretrained(folder)
    CLOCLlavaProcessor.from_model_config(config, tokenizer).save_pretrained(folder)
    return folder


def png_bytes(size: tuple[int, int] = (64, 48), mode: str = "RGB", colour: int | tuple = (200, 30, 30)) -> bytes:
    """An encoded PNG of one colour."""
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, "PNG")
    return buffer.getvalue()
