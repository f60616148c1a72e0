"""Processor for CLOC-LLaVA: images, text with ``<image>``/``<region>`` placeholders, boxes and the chat template.

Two frames meet here (see DESIGN.md, "Boxes"):

- the **text** of a box (in prompts and answers) is always in the original frame: ``xyxy`` normalised by the
  original image's width and height, written with the configured box codec;
- the **prompter** reads model-frame boxes; the processor maps each region's box through the *same*
  :class:`~cloc_encoder.image_processing.FrameTransform` that placed its image in the ``S×S`` input.

A region in a prompt is written ``[x1, y1, x2, y2] <region>`` (see :meth:`CLOCLlavaProcessor.format_region`).
Its box comes from ``boxes`` when given, else from the box text right before the ``<region>`` token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, ProcessorMixin

from cloc_encoder.boxes import validate_box
from cloc_encoder.image_processing import CLOCImageProcessor
from mllm.box_codec import BOX_PATTERN, DEFAULT_BOX_CODEC, Box, get_box_codec
from mllm.chat_template import VICUNA_V1_CHAT_TEMPLATE
from mllm.tokenization import IMAGE_TOKEN, REGION_TOKEN


class CLOCLlavaProcessor(ProcessorMixin):
    """A :class:`~cloc_encoder.image_processing.CLOCImageProcessor` and a tokenizer, plus the MLLM's text rules.

    Args:
        image_processor: the CLOC image processor (its ``image_size`` must match the vision tower).
        tokenizer: a tokenizer that knows ``image_token`` and ``region_token`` as single tokens
            (:func:`mllm.tokenization.add_mllm_tokens`).
        chat_template: Jinja template; defaults to the tokenizer's, else Vicuna v1. The processor and the tokenizer
            then hold the same template string, so training prompts and inference prompts are rendered alike.
        image_seq_length: ``<image>`` tokens per image (``CLOCLlavaConfig.image_seq_length``).
        box_codec: box⇄text codec name (``CLOCLlavaConfig.box_codec``).
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        image_seq_length: int | None = None,
        box_codec: str = DEFAULT_BOX_CODEC,
        image_token: str = IMAGE_TOKEN,
        region_token: str = REGION_TOKEN,
        **kwargs: Any,
    ) -> None:
        if tokenizer is None or image_processor is None:
            raise ValueError("CLOCLlavaProcessor needs an image_processor (CLOCImageProcessor) and a tokenizer")
        self.image_seq_length = image_seq_length
        self.box_codec = get_box_codec(box_codec).name
        self.image_token = image_token
        self.region_token = region_token
        self.image_token_id = self._single_token_id(tokenizer, image_token)
        self.region_token_id = self._single_token_id(tokenizer, region_token)
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None) or VICUNA_V1_CHAT_TEMPLATE
        tokenizer.chat_template = chat_template
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @staticmethod
    def _single_token_id(tokenizer: Any, token: str) -> int:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer does not know {token!r} as one token (got ids {ids}); add it with "
                "mllm.tokenization.add_mllm_tokens(tokenizer) and resize the model's token embeddings"
            )
        return ids[0]

    @classmethod
    def from_model_config(cls, config: Any, tokenizer: Any, **kwargs: Any) -> CLOCLlavaProcessor:
        """A processor matching a :class:`~mllm.CLOCLlavaConfig` (image size, sequence length, box codec)."""
        image_kwargs = kwargs.pop("image_processor_kwargs", {})
        return cls(
            image_processor=CLOCImageProcessor.for_model(config.vision_config, **image_kwargs),
            tokenizer=tokenizer,
            image_seq_length=config.image_seq_length,
            box_codec=config.box_codec,
            **kwargs,
        )

    # ----- boxes as text ------------------------------------------------------------------------------------------

    @property
    def codec(self):
        return get_box_codec(self.box_codec)

    def format_box(self, box: Sequence[float]) -> str:
        """Normalised original-frame ``xyxy`` → box text, e.g. ``"[12, 340, 560, 999]"``."""
        return self.codec.encode(box)

    def format_region(self, box: Sequence[float]) -> str:
        """``"[x1, y1, x2, y2] <region>"`` for a normalised original-frame box: how a prompt refers to a region."""
        return f"{self.codec.encode(box)} {self.region_token}"

    def post_process_boxes(
        self, text: str | Sequence[str], image_size: tuple[int, int] | Sequence[tuple[int, int]] | None = None
    ) -> list[Box] | list[list[Box]]:
        """Boxes written in generated text (never raises on malformed text: no box → ``[]``).

        Returns normalised original-frame ``xyxy`` boxes, or pixel ``xyxy`` when ``image_size`` ``(width, height)``
        is given (one size per text for a list of texts).
        """
        if isinstance(text, str):
            return self._boxes_in(text, image_size)  # type: ignore[arg-type]
        sizes = image_size if image_size is not None else [None] * len(text)
        return [self._boxes_in(t, s) for t, s in zip(text, sizes, strict=True)]

    def _boxes_in(self, text: str, image_size: tuple[int, int] | None) -> list[Box]:
        boxes = self.codec.parse_boxes(text)
        if image_size is None:
            return boxes
        width, height = image_size
        return [(x1 * width, y1 * height, x2 * width, y2 * height) for x1, y1, x2, y2 in boxes]

    # ----- call ---------------------------------------------------------------------------------------------------

    def __call__(
        self,
        images: Image.Image | Sequence[Image.Image] | Sequence[Sequence[Image.Image]] | None = None,
        text: str | Sequence[str] | None = None,
        boxes: Sequence[Sequence[Sequence[float]] | None] | None = None,
        return_tensors: str = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Images + texts (+ region boxes) → model inputs.

        Args:
            images: one image per ``<image>`` in the texts, in order (flat, or one list per sample).
            text: a prompt or a batch; each ``<image>`` is expanded to ``image_seq_length`` tokens.
            boxes: per sample, ``(R_i, 4)`` normalised **original-frame** boxes for its ``<region>`` tokens in order
                (``None`` for a sample: read each box from the text before its ``<region>``).
            kwargs: tokenizer arguments (``padding``, ``padding_side``, ...).

        Returns:
            ``input_ids``, ``attention_mask``, ``pixel_values`` ``(I, 3, S, S)`` and, when the texts have regions,
            ``region_boxes`` ``(R, 4)`` fp32 model-frame and ``region_image_index`` ``(R,)``; ``.to(device, dtype)``
            casts ``pixel_values`` but keeps ``region_boxes`` in fp32.
        """
        if return_tensors != "pt":
            raise ValueError(
                f"CLOCLlavaProcessor returns torch tensors only (return_tensors='pt'), got {return_tensors!r}"
            )
        if text is None:
            raise ValueError("CLOCLlavaProcessor needs text (use the image processor alone for images only)")
        texts = [text] if isinstance(text, str) else list(text)
        flat_images = _flatten_images(images)
        images_per_sample = [t.count(self.image_token) for t in texts]
        if sum(images_per_sample) != len(flat_images):
            raise ValueError(
                f"the texts have {sum(images_per_sample)} {self.image_token} tokens but {len(flat_images)} images "
                "were given; put one image token per image"
            )
        if boxes is not None and len(boxes) != len(texts):
            raise ValueError(
                f"boxes has {len(boxes)} entries for {len(texts)} texts; pass one (possibly None) per text"
            )

        data: dict[str, Any] = {}
        transforms = []
        if flat_images:
            if self.image_seq_length is None:
                raise ValueError("CLOCLlavaProcessor.image_seq_length is not set; build it with from_model_config")
            processed = self.image_processor(flat_images)
            data["pixel_values"] = processed["pixel_values"]
            transforms = processed["frame_transforms"]

        region_boxes, region_index = [], []
        first_image = 0
        for sample, sample_text in enumerate(texts):
            sample_boxes = self._region_boxes(sample, sample_text, None if boxes is None else boxes[sample])
            if sample_boxes:
                if images_per_sample[sample] != 1:
                    raise ValueError(
                        f"text {sample} has {len(sample_boxes)} regions and {images_per_sample[sample]} "
                        "images; regions need exactly one image in their text"
                    )
                region_boxes.append(transforms[first_image].region_boxes_to_model(sample_boxes))
                region_index.extend([first_image] * len(sample_boxes))
            first_image += images_per_sample[sample]

        expanded = [t.replace(self.image_token, self.image_token * (self.image_seq_length or 0)) for t in texts]
        encoding = self.tokenizer(expanded, return_tensors="pt", **kwargs)
        self._check_token_counts(encoding["input_ids"], images_per_sample, len(region_index))
        data.update(encoding)
        if region_index:
            data["region_boxes"] = torch.cat(region_boxes).float()
            data["region_image_index"] = torch.tensor(region_index, dtype=torch.long)
        return CLOCLlavaBatchFeature(data=data)

    def _region_boxes(self, sample: int, text: str, given: Sequence[Sequence[float]] | None) -> list[list[float]]:
        """Original-frame boxes of the ``<region>`` tokens of one text, in order."""
        pattern = re.compile(rf"(?:(?P<box>{BOX_PATTERN.pattern})\s*)?{re.escape(self.region_token)}")
        matches = list(pattern.finditer(text))
        if given is not None:
            given = [list(validate_box(b, where=f"boxes[{sample}][{k}]")) for k, b in enumerate(given)]
            if len(given) != len(matches):
                raise ValueError(f"text {sample} has {len(matches)} {self.region_token} tokens but {len(given)} boxes")
            return given
        found = []
        for k, match in enumerate(matches):
            box = self.codec.parse_first_box(match.group("box")) if match.group("box") else None
            if box is None:
                raise ValueError(
                    f"text {sample}: {self.region_token} #{k} is not preceded by a box like "
                    f"{self.format_box((0.1, 0.2, 0.3, 0.4))!r} and no boxes were passed; write regions with "
                    "processor.format_region(box) or pass boxes="
                )
            found.append(list(box))
        return found

    def _check_token_counts(self, input_ids: torch.Tensor, images_per_sample: list[int], num_regions: int) -> None:
        image_counts = (input_ids == self.image_token_id).sum(dim=1).tolist()
        for sample, (have, images) in enumerate(zip(image_counts, images_per_sample, strict=True)):
            if have != images * (self.image_seq_length or 0):
                raise ValueError(
                    f"text {sample} has {have} image tokens after tokenization, expected {images} x "
                    f"{self.image_seq_length}; was it truncated?"
                )
        if int((input_ids == self.region_token_id).sum()) != num_regions:
            raise ValueError(
                f"the tokenized texts have {int((input_ids == self.region_token_id).sum())} "
                f"{self.region_token} tokens but {num_regions} regions; was a text truncated?"
            )

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path: Any, processor_dict: Any = None, **kwargs):
        """Load the CLOC image processor by its class (it is not in transformers' image-processor mapping) and the
        tokenizer with ``AutoTokenizer``."""
        subfolder = kwargs.pop("subfolder", "")
        image_processor = CLOCImageProcessor.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        return [image_processor, tokenizer]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "region_boxes", "region_image_index"]


class CLOCLlavaBatchFeature(BatchFeature):
    """The processor's output: a :class:`~transformers.BatchFeature` whose ``.to(dtype)`` leaves ``region_boxes``
    in fp32 (``inputs.to(device, torch.bfloat16)`` would round coordinates to steps of 1/256; the prompter
    computes its geometry in fp32 and casts only the result)."""

    def to(self, *args: Any, **kwargs: Any) -> CLOCLlavaBatchFeature:
        boxes = self.get("region_boxes")
        moved = super().to(*args, **kwargs)
        if boxes is not None:
            moved["region_boxes"] = boxes.to(device=moved["region_boxes"].device, dtype=torch.float32)
        return moved


def _flatten_images(images: Any) -> list[Image.Image]:
    if images is None:
        return []
    if isinstance(images, Image.Image):
        return [images]
    flat = []
    for item in images:
        flat.extend([item] if isinstance(item, Image.Image) else list(item))
    return flat


__all__ = ["CLOCLlavaBatchFeature", "CLOCLlavaProcessor"]
