"""Image preprocessing for the CLOC encoder, and the one place that maps boxes through it.

The paper resizes the long side to the model's input size and pads the rest (``resize_mode="pad"``). The same
:class:`FrameTransform` that places the image in the model input maps boxes between the two frames:

- original frame: ``xyxy`` normalised by the original image's width and height (the project's convention);
- model frame: ``xyxy`` normalised by the model input's side ``S`` (what the prompter and box head use).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_base import ImageProcessingMixin

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("pad", "squash", "crop")
PAD_POSITIONS = ("center", "top_left")


class RegionOutsideInputError(ValueError):
    """A region box lies wholly outside what the model sees (e.g. cut away by ``resize_mode="crop"``)."""


@dataclass(frozen=True)
class FrameTransform:
    """Affine map between an original image and the ``S×S`` model input, per axis.

    A point at original pixel ``u`` lands at model pixel ``u·scale + offset``. ``scale_x``/``scale_y`` are exact
    ratios of the resized to the original size, so the inverse is exact.
    """

    width: int
    height: int
    size: int
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float

    def _to_model_unclipped(self, boxes: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
        """Original-frame normalised ``(..., 4)`` → model-frame normalised, fp64, not clipped."""
        boxes = torch.as_tensor(boxes, dtype=torch.float64)
        scale = boxes.new_tensor([self.width * self.scale_x, self.height * self.scale_y] * 2)
        offset = boxes.new_tensor([self.offset_x, self.offset_y] * 2)
        return (boxes * scale + offset) / self.size

    def boxes_to_model(self, boxes: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
        """Original-frame normalised ``(..., 4)`` → model-frame normalised, clipped to ``[0, 1]``."""
        return self._to_model_unclipped(boxes).clamp(0.0, 1.0).float()

    def region_boxes_to_model(self, boxes: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
        """:meth:`boxes_to_model` for boxes a user refers to: a box partly outside the model input (a centre crop
        cuts it) is clipped to its visible part; one with nothing visible raises :class:`RegionOutsideInputError`
        naming it, instead of becoming a zero-area box at the border. Boxes are ``(R, 4)`` original-frame."""
        original = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
        raw = self._to_model_unclipped(original)
        clipped = raw.clamp(0.0, 1.0)
        had_extent = original[:, 2:] > original[:, :2]  # (R, 2): x, y
        kept_extent = clipped[:, 2:] > clipped[:, :2]
        point_visible = (raw[:, :2] >= 0.0) & (raw[:, :2] <= 1.0)  # a zero-extent axis (a point, a line)
        hidden = torch.where(had_extent, ~kept_extent, ~point_visible).any(dim=1)
        if bool(hidden.any()):
            index = int(hidden.nonzero()[0, 0])
            box = [round(v, 4) for v in original[index].tolist()]
            raise RegionOutsideInputError(
                f"region {index}: box {box} lies outside the part of the {self.width}x{self.height} image the model "
                "sees (its preprocessing crops it away)"
            )
        return clipped.float()

    def boxes_to_original(self, boxes: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
        """Model-frame normalised ``(..., 4)`` → original-frame normalised, clipped to ``[0, 1]``."""
        boxes = torch.as_tensor(boxes, dtype=torch.float64)
        scale = boxes.new_tensor([self.width * self.scale_x, self.height * self.scale_y] * 2)
        offset = boxes.new_tensor([self.offset_x, self.offset_y] * 2)
        return ((boxes * self.size - offset) / scale).clamp(0.0, 1.0).float()


class CLOCImageProcessorKwargs(TypedDict, total=False):
    """Keyword arguments ``from_pretrained(path, **kwargs)`` may override (transformers reads ``valid_kwargs``)."""

    image_size: int
    resize_mode: str
    pad_position: str
    image_mean: Sequence[float]
    image_std: Sequence[float]
    max_pixels: int


class CLOCImageProcessor(ImageProcessingMixin):
    """Long-side resize + pad (the paper's recipe), or squash / centre-crop, to an ``S×S`` RGB tensor.

    Args:
        image_size: model input side ``S`` in pixels.
        resize_mode: ``"pad"`` (long side to ``S``, pad the rest), ``"squash"`` (resize to ``S×S``) or ``"crop"``
            (short side to ``S``, centre crop; boxes are clipped to the crop).
        pad_position: ``"center"`` (as LLaVA's expand-to-square) or ``"top_left"`` (as SAM).
        image_mean, image_std: per-channel normalisation; padding uses the mean colour (0 after normalising).
        max_pixels: refuse images with more pixels than this (decompression bombs, huge uploads).
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = CLOCImageProcessorKwargs

    def __init__(
        self,
        image_size: int = 224,
        resize_mode: str = "pad",
        pad_position: str = "center",
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        max_pixels: int = 64_000_000,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode={resize_mode!r}; expected one of {RESIZE_MODES}")
        if pad_position not in PAD_POSITIONS:
            raise ValueError(f"pad_position={pad_position!r}; expected one of {PAD_POSITIONS}")
        self.image_size = int(image_size)
        self.resize_mode = resize_mode
        self.pad_position = pad_position
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.max_pixels = int(max_pixels)

    def frame_transform(self, width: int, height: int) -> FrameTransform:
        """The map from a ``width×height`` original image to the model input."""
        size = self.image_size
        if self.resize_mode == "squash":
            new_width, new_height = size, size
        elif self.resize_mode == "pad":
            ratio = size / max(width, height)
            new_width, new_height = max(1, round(width * ratio)), max(1, round(height * ratio))
        else:  # crop: as CLIPImageProcessor (short side to S, long side truncated, then a centre crop)
            short, long = min(width, height), max(width, height)
            long_side = max(size, int(size * long / short))
            new_width, new_height = (long_side, size) if width >= height else (size, long_side)
        if self.resize_mode == "pad" and self.pad_position == "top_left":
            offset_x = offset_y = 0.0
        elif self.resize_mode == "crop":  # the crop starts (new - S) // 2 into the resized image, as CLIP's
            offset_x, offset_y = -((new_width - size) // 2), -((new_height - size) // 2)
        else:  # centred padding
            offset_x, offset_y = (size - new_width) // 2, (size - new_height) // 2
        return FrameTransform(
            width=width,
            height=height,
            size=size,
            scale_x=new_width / width,
            scale_y=new_height / height,
            offset_x=float(offset_x),
            offset_y=float(offset_y),
        )

    def to_model_pixels(self, image: Image.Image) -> tuple[torch.Tensor, FrameTransform]:
        """One PIL image → ``(3, S, S)`` normalised tensor and its :class:`FrameTransform`."""
        if image.width * image.height > self.max_pixels:
            raise ValueError(
                f"image of {image.width}x{image.height} pixels exceeds max_pixels={self.max_pixels}; resize it first"
            )
        transform = self.frame_transform(image.width, image.height)
        new_size = (round(transform.scale_x * image.width), round(transform.scale_y * image.height))
        resized = image.convert("RGB").resize(new_size, Image.Resampling.BICUBIC)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        canvas = np.empty((self.image_size, self.image_size, 3), dtype=np.float32)
        canvas[:] = mean
        pixels = np.asarray(resized, dtype=np.float32) / 255.0
        x0, y0 = int(transform.offset_x), int(transform.offset_y)
        src_x0, src_y0 = max(0, -x0), max(0, -y0)
        dst_x0, dst_y0 = max(0, x0), max(0, y0)
        copy_w = min(pixels.shape[1] - src_x0, self.image_size - dst_x0)
        copy_h = min(pixels.shape[0] - src_y0, self.image_size - dst_y0)
        canvas[dst_y0 : dst_y0 + copy_h, dst_x0 : dst_x0 + copy_w] = pixels[
            src_y0 : src_y0 + copy_h, src_x0 : src_x0 + copy_w
        ]
        canvas = (canvas - mean) / np.asarray(self.image_std, dtype=np.float32)
        return torch.from_numpy(canvas).permute(2, 0, 1).contiguous(), transform

    def __call__(
        self,
        images: Image.Image | Sequence[Image.Image],
        boxes: Sequence[Any] | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Preprocess images (and their original-frame boxes).

        Returns a :class:`BatchFeature` with ``pixel_values`` ``(B, 3, S, S)``, ``image_sizes`` ``(B, 2)`` as
        (height, width), ``frame_transforms`` (one :class:`FrameTransform` per image) and, when ``boxes`` is given
        (one ``(R_i, 4)`` list per image), ``boxes``: a list of model-frame ``(R_i, 4)`` tensors.
        """
        if isinstance(images, Image.Image):
            images = [images]
            boxes = None if boxes is None else [boxes]
        pixel_values, transforms = zip(*(self.to_model_pixels(image) for image in images), strict=True)
        data: dict[str, Any] = {
            "pixel_values": torch.stack(pixel_values),
            "image_sizes": torch.tensor([[t.height, t.width] for t in transforms]),
        }
        if boxes is not None:
            if len(boxes) != len(images):
                raise ValueError(f"got boxes for {len(boxes)} images but {len(images)} images")
            data["boxes"] = [
                t.boxes_to_model(torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4))
                for t, b in zip(transforms, boxes, strict=True)
            ]
        feature = BatchFeature(data=data)
        feature["frame_transforms"] = list(transforms)
        return feature

    @classmethod
    def for_model(cls, model_config: Any, **kwargs: Any) -> CLOCImageProcessor:
        """A processor matching a CLOC config's vision input size (mean/std by backbone)."""
        size = model_config.vision_config.image_size
        if getattr(model_config, "backbone", "clip") == "siglip":
            kwargs.setdefault("image_mean", (0.5, 0.5, 0.5))
            kwargs.setdefault("image_std", (0.5, 0.5, 0.5))
        return cls(image_size=size, **kwargs)
