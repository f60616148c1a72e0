"""``CLOCPredictor``: set an image once, then get region embeddings, classifications and boxes cheaply.

Modelled on segment-anything's ``SamPredictor``. Boxes going in and out are in the project's convention:
``xyxy`` normalised to ``[0, 1]`` by the original image's width and height.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase

from cloc_encoder.image_processing import CLOCImageProcessor, FrameTransform
from cloc_encoder.modeling_cloc import CLOCImageState, CLOCModel


class CLOCPredictor:
    """Encode-once, prompt-many API over a :class:`CLOCModel`."""

    def __init__(
        self,
        model: CLOCModel,
        tokenizer: PreTrainedTokenizerBase,
        processor: CLOCImageProcessor | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = processor or CLOCImageProcessor.for_model(model.config)
        self._state: CLOCImageState | None = None
        self._transform: FrameTransform | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def set_image(self, image: Image.Image) -> None:
        """Run the ViT once on ``image`` and keep its features for later prompts."""
        batch = self.processor([image])
        pixel_values = batch["pixel_values"].to(self.device, next(self.model.parameters()).dtype)
        self._state = self.model.encode_images(pixel_values)
        self._transform = batch["frame_transforms"][0]

    def _require_image(self) -> tuple[CLOCImageState, FrameTransform]:
        if self._state is None or self._transform is None:
            raise RuntimeError("An image must be set with .set_image(...) before prompting.")
        return self._state, self._transform

    @torch.inference_mode()
    def region_embeddings(self, boxes: Sequence[Sequence[float]] | torch.Tensor) -> torch.Tensor:
        """L2-normalised region embeddings ``(R, D)`` for original-frame normalised ``xyxy`` boxes ``(R, 4)``."""
        state, transform = self._require_image()
        model_boxes = transform.region_boxes_to_model(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        image_index = torch.zeros(len(model_boxes), dtype=torch.long, device=self.device)
        embeds = self.model.region_embeddings(state, model_boxes.to(self.device), image_index)
        return F.normalize(embeds.float(), dim=-1)

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``(N, D)``."""
        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt")
        output = self.model.encode_text(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
        return F.normalize(output.text_embeds.float(), dim=-1)

    @torch.inference_mode()
    def classify_regions(
        self, boxes: Sequence[Sequence[float]] | torch.Tensor, class_names: Sequence[str]
    ) -> tuple[list[str], torch.Tensor]:
        """Zero-shot region classification: the best class name per box and the ``(R, C)`` probabilities."""
        similarity = self.region_embeddings(boxes) @ self.text_embeddings(class_names).t()
        probabilities = (similarity * self.model.logit_scale.exp().float()).softmax(dim=-1)
        return [class_names[i] for i in probabilities.argmax(dim=-1).tolist()], probabilities

    @torch.inference_mode()
    def predict_boxes(self, texts: Sequence[str]) -> torch.Tensor:
        """Text → box with the box head: ``(N, 4)`` original-frame normalised ``xyxy``."""
        state, transform = self._require_image()
        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt")
        text = self.model.encode_text(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
        vectors = text.text_embeds if self.model.config.text_prompt_input == "embedding" else text.pooled
        image_index = torch.zeros(len(texts), dtype=torch.long, device=self.device)
        model_boxes = self.model.predict_boxes(state, vectors, image_index)
        return transform.boxes_to_original(model_boxes.float().cpu())
