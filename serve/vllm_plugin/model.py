"""CLOC-LLaVA as a vLLM model: the project's vision tower, prompter and projectors around vLLM's own language model.

- Vision side: :class:`~mllm.vision_tower.CLOCVisionTower` (CLIP/SigLIP ViT + CLOC prompter) and two
  :class:`~mllm.modeling_cloc_llava.CLOCLlavaProjector` s, built from the checkpoint's config exactly as
  :class:`~mllm.CLOCLlavaModel` builds them. Image and region features are computed by
  :class:`~mllm.modeling_cloc_llava.CLOCLlavaVisualFeatures`, the mixin ``CLOCLlavaModel`` uses too, so the vLLM
  path computes the same features as ``generate`` by construction. These modules are
  plain PyTorch: under tensor parallelism every rank holds and runs a full copy (the tower is small next to the LLM).
- Language model: vLLM's implementation of ``text_config``'s architecture (``LlamaForCausalLM``, ...), with paged
  attention, tensor and pipeline parallelism.
- :meth:`embed_multimodal` returns, per image, the projected prompter features of the regions before the image
  in the prompt, its ``image_seq_length`` projected patch features, then those of the regions after it: the order
  of the image and ``<region>`` tokens that the processor (:mod:`serve.vllm_plugin.processing`) marks in the
  image's placeholder range.

Weights load from the ``save_pretrained`` folder (``model.vision_tower.*``, ``model.multi_modal_projector.*``,
``model.region_projector.*``, ``model.language_model.*``, ``lm_head.*``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from mllm import CLOCLlavaConfig
from mllm.modeling_cloc_llava import CLOCLlavaProjector, CLOCLlavaVisualFeatures
from mllm.vision_tower import CLOCVisionTower
from serve.vllm_plugin import TOKENIZER_MODE
from serve.vllm_plugin.processing import (
    REGIONS_BEFORE_IMAGE_KWARG,
    CLOCLlavaDummyInputsBuilder,
    CLOCLlavaMultiModalProcessor,
    CLOCLlavaProcessingInfo,
)


def language_model_architecture(config: CLOCLlavaConfig) -> str:
    """The causal-LM architecture vLLM should build for ``config.text_config`` (its ``architectures`` entry, else
    transformers' causal-LM class for its ``model_type``)."""
    text = config.text_config
    if getattr(text, "architectures", None):
        return text.architectures[0]
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text.model_type)
    if name is None:
        raise ValueError(f"no causal-LM architecture known for text_config.model_type={text.model_type!r}")
    return name


def _per_image(value: object, num_images: int) -> torch.Tensor:
    """A batched per-image count field (a tensor, a list of 0-d tensors, or absent: zeros) as ``(num_images,)``."""
    if value is None:
        return torch.zeros(num_images, dtype=torch.long)
    if isinstance(value, (list, tuple)):
        value = torch.stack([torch.as_tensor(v) for v in value])
    return torch.as_tensor(value).reshape(-1).long()


@MULTIMODAL_REGISTRY.register_processor(
    CLOCLlavaMultiModalProcessor, info=CLOCLlavaProcessingInfo, dummy_inputs=CLOCLlavaDummyInputsBuilder
)
class CLOCLlavaForConditionalGenerationVLLM(CLOCLlavaVisualFeatures, nn.Module, SupportsMultiModal, SupportsPP):
    """vLLM's CLOC-LLaVA (see the module docstring)."""

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.language_model.": "language_model.model.",
            "model.vision_tower.": "vision_tower.",
            "model.multi_modal_projector.": "multi_modal_projector.",
            "model.region_projector.": "region_projector.",
            "lm_head.": "language_model.lm_head.",
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError(f"CLOC-LLaVA takes images only, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: CLOCLlavaConfig = vllm_config.model_config.hf_config
        self.config = config
        if vllm_config.model_config.tokenizer_mode != TOKENIZER_MODE:
            logging.getLogger(__name__).warning(
                "serve with --tokenizer-mode %s so that regions sent without an image are refused (docs/serving.md)",
                TOKENIZER_MODE,
            )
        self.configure_mm_token_handling(
            vocab_size=config.text_config.vocab_size, mm_token_ids=[config.image_token_id, config.region_token_id]
        )
        bias = config.multimodal_projector_bias
        hidden = config.text_config.hidden_size
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = CLOCVisionTower._from_config(config.vision_config)
            self.multi_modal_projector = CLOCLlavaProjector(
                config.image_projector_input_size, hidden, config.projector_type, bias
            )
            self.region_projector = CLOCLlavaProjector(
                config.region_feature_size, hidden, config.region_projector_type, bias
            )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=[language_model_architecture(config)],
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """Per image: ``(image_seq_length + R_i, H)`` = its first ``regions_before_image`` regions' features, the
        projected patch features, then its other regions' features (the prompt's order)."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        boxes = kwargs.get("region_boxes")
        num_images = pixel_values.shape[0]
        counts = _per_image(kwargs.get("region_counts"), num_images)
        before = _per_image(kwargs.get(REGIONS_BEFORE_IMAGE_KWARG), num_images)
        if isinstance(boxes, (list, tuple)):
            boxes = torch.cat([b.reshape(-1, 4) for b in boxes]) if boxes else None
        image_features, state = self.encode_images(pixel_values)
        per_image: list[torch.Tensor] = list(image_features)
        if boxes is not None and boxes.numel():
            index = torch.repeat_interleave(torch.arange(num_images, device=boxes.device), counts.to(boxes.device))
            region_features = self.get_region_features(state, boxes.reshape(-1, 4).float(), index)
            region_features = region_features.to(image_features.dtype)
            for image, features in enumerate(torch.split(region_features, counts.tolist())):
                first = int(before[image])
                per_image[image] = torch.cat([features[:first], per_image[image], features[first:]])
        return per_image

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The LM's logits with ``<image>`` and ``<region>`` never sampled (``serve.engine`` suppresses them too)."""
        logits = self.language_model.compute_logits(hidden_states)
        if logits is not None:
            placeholders = [
                t for t in (self.config.image_token_id, self.config.region_token_id) if t < logits.shape[-1]
            ]
            logits[..., placeholders] = float("-inf")
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self)
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)


__all__ = ["CLOCLlavaForConditionalGenerationVLLM", "language_model_architecture"]
