"""VESL step 1: re-caption images with any transformers image-to-text model loaded from a local folder.

Anything ``AutoModelForImageTextToText`` loads works (BLIP, BLIP-2, GIT, Florence-2, LLaVA-style models, a
``VisionEncoderDecoderModel``); captions are decoded greedily (or with beam search), so a run is deterministic.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from PIL import Image


class Captioner(Protocol):
    """Images → one caption each."""

    def __call__(self, images: Sequence[Image.Image]) -> list[str]: ...


class HFCaptioner:
    """A transformers image-to-text model as a :class:`Captioner`.

    Args:
        path: local model folder (``AutoProcessor`` + ``AutoModelForImageTextToText``).
        prompt: text prompt for models that take one, already in the model's own format (e.g. a chat template's
            output); ``None`` for plain captioners such as BLIP.
        max_new_tokens, num_beams: generation settings (greedy when ``num_beams == 1``).
        device, dtype: where and in which precision the model runs.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        prompt: str | None = None,
        max_new_tokens: int = 128,
        num_beams: int = 1,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
        processor = AutoProcessor.from_pretrained(path)
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:  # e.g. a VisionEncoderDecoderModel folder without a processor config
            self.image_processor: Any = AutoImageProcessor.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            self.processor: Any = None
        else:
            self.processor, self.image_processor = processor, None
        self.tokenizer = tokenizer
        self.encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        if not self.encoder_decoder:
            tokenizer.padding_side = "left"  # batched prompts of decoder-only models continue from the right
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.device = torch.device(device)
        self.dtype = dtype

    def _inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        text = [self.prompt] * len(images) if self.prompt else None
        if self.processor is not None:
            kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
            if text is not None:
                kwargs.update(text=text, padding=True)
            inputs = dict(self.processor(**kwargs))
        else:
            inputs = dict(self.image_processor(images, return_tensors="pt"))
            if text is not None:
                encoded = self.tokenizer(text, padding=True, return_tensors="pt")
                inputs.update(decoder_input_ids=encoded["input_ids"])
        return {
            key: value.to(self.device, self.dtype if value.is_floating_point() else None)
            for key, value in inputs.items()
            if isinstance(value, torch.Tensor)
        }

    @torch.inference_mode()
    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        images = [image.convert("RGB") for image in images]
        if not images:
            return []
        inputs = self._inputs(images)
        output = self.model.generate(
            **inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False
        )
        prompt_ids = inputs.get("input_ids")
        echoed = (
            prompt_ids is not None
            and not self.encoder_decoder
            and output.shape[1] >= prompt_ids.shape[1]
            and torch.equal(output[:, : prompt_ids.shape[1]], prompt_ids)
        )
        if echoed:
            output = output[:, prompt_ids.shape[1] :]  # decoder-only models echo the prompt
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]


__all__ = ["Captioner", "HFCaptioner"]
