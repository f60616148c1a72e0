"""A stage-2 training sample through the project's processor: an ``<image>``, two ``<region>``s (one thin) and an
answer."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from mllm import CLOCLlavaConfig, CLOCLlavaProcessor
from mllm.tokenization import IMAGE_TOKEN

REGION_BOXES = ((0.10, 0.20, 0.45, 0.70), (0.900, 0.300, 0.903, 0.950))
"""Original-frame boxes of the two ``<region>``s; the second is ~1.5 px wide on a 500-px image, near x = 0.9 (where
bf16 coordinates move in steps of 1/256)."""


def build_processor(config: CLOCLlavaConfig, tokenizer: PreTrainedTokenizerBase) -> CLOCLlavaProcessor:
    """The project's processor for ``config`` (image size, image tokens, box codec)."""
    return CLOCLlavaProcessor.from_model_config(config, tokenizer)


def stage2_batch(
    processor: CLOCLlavaProcessor, batch_size: int = 1, seed: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A stage-2 sample (``<image>`` + two ``<region>``s + answer) repeated ``batch_size`` times, through the
    processor (a random 500×375 image, padded to square). Returns the training batch (with ``labels``: the answer
    tokens only) and the generation prompt."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
    regions = [processor.format_region(box) for box in REGION_BOXES]
    prompt = f"USER: {IMAGE_TOKEN}\nWhat are {regions[0]} and {regions[1]}? ASSISTANT:"
    answer = " A red circle and a thin blue line.</s>"
    batch = processor(images=[image] * batch_size, text=[prompt + answer] * batch_size)
    prompt_inputs = processor(images=[image] * batch_size, text=[prompt] * batch_size)
    labels = batch["input_ids"].clone()
    labels[:, : prompt_inputs["input_ids"].shape[1]] = -100
    training = {**batch, "labels": labels}
    return dict(training), dict(prompt_inputs)
