"""vLLM's multimodal processor for CLOC-LLaVA: ``<image>`` expansion, region boxes, and their placeholder ranges.

- ``<image>``: replaced by ``image_seq_length`` image tokens (:class:`~vllm.multimodal.processing.PromptReplacement`,
  as vLLM's LLaVA does); the pixels come from the project's :class:`~cloc_encoder.image_processing.CLOCImageProcessor`
  (the processor saved with the model), so they equal what :class:`~mllm.CLOCLlavaProcessor` feeds ``generate``.
- ``<region>``: the boxes travel with the image item, as the request's ``mm_processor_kwargs={"regions": [...]}``
  (vLLM hashes those kwargs into the item's cache key, so two requests with the same image and different regions
  never share encoder outputs or prefix-cache blocks). :meth:`CLOCLlavaMultiModalProcessor.apply` applies the
  ``regions`` rule of :mod:`serve.vllm_plugin.regions` to the prompt (``[regionK]`` references, or one box per
  ``<region>``), and the image's own :class:`~cloc_encoder.image_processing.FrameTransform` maps the boxes to the
  model frame (``FrameTransform.boxes_to_model``, the call ``CLOCLlavaProcessor`` makes).
- Placeholders: the image item's placeholder range runs from its first image or ``<region>`` token to its last,
  with ``is_embed`` marking the image and ``<region>`` tokens only; the model returns, per image, the features of
  the ``<region>`` tokens before the image (a question asked before the image, as ``instruction_first`` templates
  do), its ``image_seq_length`` image features, then the features of the ``<region>`` tokens after it, and vLLM
  scatters them in that order. So the prompter's outputs land exactly on the ``<region>`` positions, and vLLM's
  scheduler, encoder cache and prefix cache treat them as part of the image item.

Bad requests raise :class:`vllm.exceptions.VLLMValidationError`, which vLLM's server answers
with a 400 and a message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.exceptions import VLLMValidationError
from vllm.inputs import MultiModalDataDict, MultiModalInput
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.multimodal.processing.inputs import ProcessorInputs
from vllm.multimodal.processing.processor import (
    MultiModalPromptUpdates,
    PlaceholderFeaturesInfo,
    TimingContext,
)

from mllm import CLOCLlavaConfig, CLOCLlavaProcessor
from serve import InputError
from serve.vllm_plugin.regions import parse_regions, resolve_regions

MAX_REGIONS_PER_IMAGE = 64
"""Most ``<region>`` tokens one image may feed (bounds the encoder-cache size vLLM reserves per image item)."""

REGIONS_KWARG = "regions"
"""The ``mm_processor_kwargs`` key that carries a request's region boxes."""

REGIONS_BEFORE_IMAGE_KWARG = "regions_before_image"
"""Set by the processor (never by a request): how many of the boxes belong to ``<region>`` tokens before the image;
also the name of the per-image field that carries that count to the model."""


class CLOCLlavaProcessingInfo(BaseProcessingInfo):
    """What vLLM needs to know about CLOC-LLaVA inputs: one image per prompt, ``image_seq_length`` tokens each."""

    def get_hf_config(self) -> CLOCLlavaConfig:
        return self.ctx.get_hf_config(CLOCLlavaConfig)

    def get_hf_processor(self, **kwargs: object) -> CLOCLlavaProcessor:
        """The processor saved with the model (image processor, tokenizer, box codec); ``kwargs`` are request
        options (``regions``), not processor settings, so they are not passed on."""
        return self.ctx.get_hf_processor(CLOCLlavaProcessor)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        # One image per conversation, as in training and serve.api; its regions ride with it.
        return {"image": 1}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"text_kwargs": set(), "images_kwargs": {REGIONS_KWARG}}

    def get_num_image_tokens(self) -> int:
        """``<image>`` tokens per image (the tower's patch count; fixed: every image is resized to ``S×S``)."""
        return int(self.get_hf_config().image_seq_length)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # Embeddings per image item: its image tokens plus up to MAX_REGIONS_PER_IMAGE region features.
        return {"image": self.get_num_image_tokens() + MAX_REGIONS_PER_IMAGE}


class CLOCLlavaDummyInputsBuilder(BaseDummyInputsBuilder[CLOCLlavaProcessingInfo]):
    """Profiling inputs: ``<image>`` per image, each image at the tower's input size."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions
    ) -> MultiModalDataDict:
        size = self.info.get_hf_processor().image_processor.image_size
        return {
            "image": self._get_dummy_images(
                width=size, height=size, num_images=mm_counts.get("image", 0), overrides=mm_options.get("image")
            )
        }


def _as_pil(image: Any) -> Image.Image:
    """vLLM image items are PIL images, or ``HWC`` uint8 arrays from offline callers."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        return Image.fromarray(image.astype(np.uint8))
    raise VLLMValidationError(
        f"CLOC-LLaVA takes images as PIL images or HWC uint8 arrays, got {type(image).__name__}", parameter="image"
    )


class CLOCLlavaMultiModalProcessor(BaseMultiModalProcessor[CLOCLlavaProcessingInfo]):
    """See the module docstring."""

    # ----- the request's regions ------------------------------------------------------------------------------

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        """Resolve the request's regions against its prompt (rewriting ``[regionK]`` references), then let vLLM
        process the image with the resolved boxes (they become part of the image item's hash)."""
        return super().apply(self._resolve_regions(inputs), timing_ctx)

    def _resolve_regions(self, inputs: ProcessorInputs) -> ProcessorInputs:
        processor = self.info.get_hf_processor()
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        unknown = sorted(set(kwargs) - {REGIONS_KWARG})
        if unknown:  # the processor reads nothing else, so --trust-request-mm-kwargs lets through only regions
            raise VLLMValidationError(
                f"CLOC-LLaVA's mm_processor_kwargs take only {REGIONS_KWARG!r}, got {unknown}",
                parameter="mm_processor_kwargs",
            )
        try:
            regions = parse_regions(kwargs.pop(REGIONS_KWARG, None))
        except InputError as error:
            raise VLLMValidationError(str(error), parameter=f"mm_processor_kwargs.{REGIONS_KWARG}") from error
        prompt = list(inputs.prompt)
        region_id = processor.region_token_id
        if not regions and region_id not in prompt:
            return dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs)
        num_images = inputs.mm_data_items.get_count("image", strict=False)
        if num_images != 1:
            raise VLLMValidationError(
                f"regions need exactly one image in the prompt, got {num_images}", parameter="messages"
            )
        tokenizer = self.info.get_tokenizer()
        text = tokenizer.decode(prompt)
        try:
            expanded, boxes = resolve_regions(text, regions, processor)
        except InputError as error:
            raise VLLMValidationError(str(error), parameter=f"mm_processor_kwargs.{REGIONS_KWARG}") from error
        if expanded != text:
            prompt = tokenizer.encode(expanded, add_special_tokens=False)
        image_positions = [i for i, token in enumerate(prompt) if token == processor.image_token_id]
        region_positions = [i for i, token in enumerate(prompt) if token == region_id]
        if len(region_positions) != len(boxes):  # box text that tokenizes oddly, or a truncated prompt
            raise VLLMValidationError(
                f"the prompt has {len(region_positions)} {processor.region_token} tokens but {len(boxes)} region "
                "boxes; pass one box per region",
                parameter=f"mm_processor_kwargs.{REGIONS_KWARG}",
            )
        if region_positions and not image_positions:
            raise VLLMValidationError(
                f"the prompt has {processor.region_token} tokens but no image; regions refer to the image",
                parameter="messages",
            )
        if len(boxes) > MAX_REGIONS_PER_IMAGE:
            raise VLLMValidationError(
                f"{len(boxes)} regions; at most {MAX_REGIONS_PER_IMAGE} per image",
                parameter=f"mm_processor_kwargs.{REGIONS_KWARG}",
            )
        kwargs[REGIONS_KWARG] = [list(box) for box in boxes]
        kwargs[REGIONS_BEFORE_IMAGE_KWARG] = sum(position < image_positions[0] for position in region_positions)
        return dataclasses.replace(inputs, prompt=prompt, hf_processor_mm_kwargs=kwargs)

    # ----- pixels and boxes (what the HF processor would return) ------------------------------------------------

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """The CLOC image processor on the images; the resolved regions (original frame) mapped to the model frame
        by the first image's :class:`~cloc_encoder.image_processing.FrameTransform`, and how many of them come
        before the image in the prompt."""
        processor = self.info.get_hf_processor()
        images = [_as_pil(image) for image in hf_data.get("images", [])]  # type: ignore[union-attr]
        processed = processor.image_processor(images)
        transforms = processed["frame_transforms"]
        boxes = list(hf_kwargs.get(REGIONS_KWARG) or [])
        counts = torch.zeros(len(images), dtype=torch.long)
        before = torch.zeros(len(images), dtype=torch.long)
        if boxes:
            region_boxes = transforms[0].region_boxes_to_model(boxes).reshape(-1, 4)
            counts[0] = len(boxes)
            before[0] = int(hf_kwargs.get(REGIONS_BEFORE_IMAGE_KWARG) or 0)
        else:
            region_boxes = torch.zeros(0, 4)
        return BatchFeature(
            {
                "pixel_values": processed["pixel_values"],
                "region_boxes": region_boxes,
                "region_counts": counts,
                REGIONS_BEFORE_IMAGE_KWARG: before,
            }
        )

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        counts = hf_inputs.get("region_counts", torch.zeros(0, dtype=torch.long))
        return {
            "pixel_values": MultiModalFieldConfig.batched("image"),
            "region_boxes": MultiModalFieldConfig.flat_from_sizes("image", counts),
            "region_counts": MultiModalFieldConfig.batched("image"),
            REGIONS_BEFORE_IMAGE_KWARG: MultiModalFieldConfig.batched("image"),
        }

    # ----- placeholders -------------------------------------------------------------------------------------------

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_id
        return [
            PromptReplacement(
                modality="image",
                target=[image_token_id],
                replacement=[image_token_id] * self.info.get_num_image_tokens(),
            )
        ]

    def _apply_prompt_updates(
        self, token_ids: list[int], mm_prompt_updates: MultiModalPromptUpdates
    ) -> tuple[list[int], Mapping[str, list[PlaceholderFeaturesInfo]]]:
        """vLLM's ``<image>`` expansion, then the image's placeholder range extended over the ``<region>`` tokens
        before and after it (``is_embed``: image and region tokens)."""
        new_token_ids, placeholders = super()._apply_prompt_updates(token_ids, mm_prompt_updates)
        config = self.info.get_hf_config()
        images = list(placeholders.get("image", []))
        if len(images) != 1:
            return new_token_ids, placeholders
        image = images[0]
        regions = [i for i, token in enumerate(new_token_ids) if token == config.region_token_id]
        if not regions:
            return new_token_ids, placeholders
        start, end = min(regions[0], image.start_idx), max(regions[-1] + 1, image.start_idx + image.length)
        tokens = new_token_ids[start:end]
        span = torch.tensor(tokens)
        is_embed = (span == config.image_token_id) | (span == config.region_token_id)
        extended = PlaceholderFeaturesInfo(
            modality="image", item_idx=image.item_idx, start_idx=start, tokens=tokens, is_embed=is_embed
        )
        return new_token_ids, {**placeholders, "image": [extended]}


__all__ = [
    "MAX_REGIONS_PER_IMAGE",
    "REGIONS_BEFORE_IMAGE_KWARG",
    "REGIONS_KWARG",
    "CLOCLlavaDummyInputsBuilder",
    "CLOCLlavaMultiModalProcessor",
    "CLOCLlavaProcessingInfo",
]
