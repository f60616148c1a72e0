"""CLOC-LLaVA: a CLOC vision tower + projectors + any causal LM, on transformers' LLaVA conventions.

One ViT pass per image gives both inputs the language model sees:

- ``<image>`` tokens: hidden states of ``config.vision_feature_layer`` (patch tokens only by default) → the
  image projector, filled into the ``<image>`` positions with ``masked_scatter`` after a count check;
- ``<region>`` tokens: the prompter over the last-layer pre-norm patch tokens (as CLOC trained it) for each
  region box → the region projector; the i-th ``<region>`` of the batch (row-major) gets the i-th box. With
  ``config.region_feature="roi_align"`` the prompter is not used: the feature-layer patch tokens are RoI-aligned
  over the box instead (:func:`roi_align_patch_features`, the CLIP baseline of Ferret / GLaMM).

Region boxes are in the **model frame** (``xyxy`` normalised over the preprocessed ``S×S`` input); the processor
maps them from the original frame with the image's :class:`~cloc_encoder.image_processing.FrameTransform`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.ops import roi_align
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from cloc_encoder import CLOCImageState
from cloc_encoder.compat import CACHE_FIELD, slice_logits_to_keep
from mllm.configuration_cloc_llava import CLOCLlavaConfig
from mllm.regions import RegionBoxes, expand_regions, flatten_region_boxes
from mllm.vision_tower import CLOCVisionTower

REGION_INPUTS = ("region_boxes", "region_image_index")
"""Model inputs used only in the prefill step of generation (like ``pixel_values``)."""
ROI_ALIGN_OUTPUT_SIZE = 2
"""``region_feature="roi_align"``: RoIAlign bins per side (2×2); each bin is sampled bilinearly (torchvision's
adaptive sampling: about one point per patch of box side) and the bins are averaged to one vector per box."""


def merge_patch_tokens(tokens: torch.Tensor, merge: int) -> torch.Tensor:
    """Concatenate each ``merge × merge`` block of neighbouring patch tokens: ``(B, G·G, C)`` row-major patch
    tokens of a ``G × G`` grid → ``(B, (G/merge)², merge²·C)``, blocks row-major, each block's patches row-major
    along the channels. Any dtype; ``G`` must be a multiple of ``merge``."""
    batch, patches, channels = tokens.shape
    grid = math.isqrt(patches)
    if grid * grid != patches or grid % merge:
        raise ValueError(
            f"cannot merge {merge} x {merge} patches of a {patches}-patch image (a square grid whose side "
            f"is a multiple of {merge} is needed)"
        )
    side = grid // merge
    blocks = tokens.reshape(batch, side, merge, side, merge, channels).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(batch, side * side, merge * merge * channels)


def roi_align_patch_features(
    patch_tokens: torch.Tensor,
    boxes: torch.Tensor,
    image_index: torch.Tensor,
    output_size: int = ROI_ALIGN_OUTPUT_SIZE,
) -> torch.Tensor:
    """RoIAlign of a square patch grid over model-frame boxes, averaged over the output bins: ``(R, W)`` fp32.

    Args:
        patch_tokens: ``(B, P, W)`` patch tokens in row-major grid order (no CLS), ``P = side²``; any dtype.
        boxes: ``(R, 4)`` model-frame ``xyxy`` normalised to ``[0, 1]``; scaled to grid units in fp32.
        image_index: ``(R,)`` image of each box.
        output_size: bins per side.

    The geometry and the interpolation run in fp32 whatever the tokens' dtype; ``aligned=True`` puts patch ``(r, c)``
    at ``[c, c + 1) × [r, r + 1)`` in grid units, so a box covering one patch is sampled around that patch's centre.
    """
    batch, count, width = patch_tokens.shape
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"roi_align needs a square patch grid, got {count} patch tokens")
    grid = patch_tokens.float().transpose(1, 2).reshape(batch, width, side, side)
    rois = torch.cat([image_index.to(torch.float32).unsqueeze(1), boxes.to(torch.float32) * side], dim=1)
    pooled = roi_align(grid, rois, output_size=output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return pooled.mean(dim=(2, 3))


@dataclass
class CLOCLlavaModelOutputWithPast(BaseModelOutputWithPast):
    """Base-model output plus the projected visual inputs: ``image_features`` ``(B, N, H)`` and
    ``region_features`` ``(R, H)`` (``None`` when not computed in this call)."""

    image_features: torch.Tensor | None = None
    region_features: torch.Tensor | None = None


@dataclass
class CLOCLlavaCausalLMOutputWithPast(CausalLMOutputWithPast):
    """LM output plus ``image_features`` ``(B, N, H)`` and ``region_features`` ``(R, H)``."""

    image_features: torch.Tensor | None = None
    region_features: torch.Tensor | None = None


class CLOCLlavaProjector(nn.Module):
    """``"mlp2x_gelu"`` (Linear → GELU → Linear, LLaVA-1.5) or ``"linear"``: ``(..., in)`` → ``(..., out)``.

    Parameter names (``linear_1``, ``linear_2``) match transformers' ``LlavaMultiModalProjector``.
    """

    def __init__(self, input_size: int, output_size: int, kind: str, bias: bool = True) -> None:
        super().__init__()
        self.kind = kind
        self.linear_1 = nn.Linear(input_size, output_size, bias=bias)
        if kind == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(output_size, output_size, bias=bias)
        elif kind != "linear":
            raise ValueError(f"projector type {kind!r}; expected 'mlp2x_gelu' or 'linear'")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(features)
        if self.kind == "mlp2x_gelu":
            hidden = self.linear_2(self.act(hidden))
        return hidden


class CLOCLlavaPreTrainedModel(PreTrainedModel):
    config_class = CLOCLlavaConfig
    config: CLOCLlavaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Not fullgraph-compilable: the placeholder count checks read tensor values on the host.
    _can_compile_fullgraph = False


class CLOCLlavaVisualFeatures:
    """The visual half of CLOC-LLaVA, shared by :class:`CLOCLlavaModel` and the vLLM model
    (``serve/vllm_plugin/model.py``): a module with ``config`` (:class:`CLOCLlavaConfig`), ``vision_tower``,
    ``multi_modal_projector`` and ``region_projector`` gets image and ``<region>`` features from it."""

    config: CLOCLlavaConfig
    vision_tower: CLOCVisionTower
    multi_modal_projector: CLOCLlavaProjector
    region_projector: CLOCLlavaProjector

    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, CLOCImageState]:
        """One ViT pass: ``(B, 3, S, S)`` → projected image features ``(B, N, H)`` and the state the prompter
        reads (for :meth:`get_region_features`)."""
        state = self.vision_tower.encode_images(pixel_values.to(self.vision_tower.dtype))
        keep_cls = self.config.vision_feature_select_strategy == "full"
        tokens = self.feature_layer_tokens(state, keep_cls)
        if self.config.image_token_merge > 1:
            tokens = merge_patch_tokens(tokens, self.config.image_token_merge)
        return self.multi_modal_projector(tokens), state

    def feature_layer_tokens(self, state: CLOCImageState, keep_cls: bool = False) -> torch.Tensor:
        """Hidden state(s) ``config.vision_feature_layer`` of the ViT pass: ``(B, P, C)`` patch tokens,
        ``(B, 1 + P, C)`` with ``keep_cls`` on a tower that has a CLS token; ``C = W`` per feature layer (several
        layers are concatenated along the channels)."""
        if state.hidden_states is None:
            raise ValueError("the image state has no hidden states: encode the images with the vision tower")
        layers = self.config.feature_layers
        hidden = [state.hidden_states[layer] for layer in layers]
        selected = hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1)
        if self.config.vision_config.has_cls_token and not keep_cls:
            selected = selected[:, 1:]
        return selected

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image features ``(B, N, H)``, ``N = config.image_seq_length``."""
        return self.encode_images(pixel_values)[0]

    def get_region_features(
        self, state: CLOCImageState, boxes: torch.Tensor, image_index: torch.Tensor
    ) -> torch.Tensor:
        """Projected region features ``(R, H)`` for model-frame ``(R, 4)`` boxes (fp32) on images ``image_index``:
        the prompter's (``"pooled"`` / ``"embedding"``) or the feature layer's RoIAlign (``"roi_align"``)."""
        device = state.patch_tokens.device  # the tower's device (it may differ from the LM's under a device map)
        boxes, image_index = boxes.to(device), image_index.to(device)
        if self.config.region_feature == "roi_align":
            tokens = self.feature_layer_tokens(state)
            features = roi_align_patch_features(tokens, boxes, image_index).to(tokens.dtype)
        else:
            pooled, embeddings = self.vision_tower.region_features(state, boxes, image_index)
            features = pooled if self.config.region_feature == "pooled" else embeddings
        return self.region_projector(features)


class CLOCLlavaModel(CLOCLlavaVisualFeatures, CLOCLlavaPreTrainedModel):
    """CLOC vision tower + image and region projectors + a language model without its LM head."""

    def __init__(self, config: CLOCLlavaConfig) -> None:
        super().__init__(config)
        hidden = config.text_config.hidden_size
        bias = config.multimodal_projector_bias
        self.vision_tower = CLOCVisionTower._from_config(config.vision_config)
        self.multi_modal_projector = CLOCLlavaProjector(
            config.image_projector_input_size, hidden, config.projector_type, bias
        )
        self.region_projector = CLOCLlavaProjector(
            config.region_feature_size, hidden, config.region_projector_type, bias
        )
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_placeholder_mask(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        token_id: int,
        num_features: int,
        what: str,
    ) -> torch.Tensor:
        """``(B, L, H)`` bool mask of the ``token_id`` positions, after checking there are ``num_features`` of them."""
        if input_ids is None:
            token = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
            mask = (inputs_embeds == token).all(-1)
        else:
            mask = input_ids == token_id
        count = int(mask.sum())
        if count != num_features:
            raise ValueError(
                f"{what} tokens and features do not match: {count} tokens (id {token_id}) in the text "
                f"but {num_features} features. {self._placeholder_hint(what)}"
            )
        return mask.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)

    def _placeholder_hint(self, what: str) -> str:
        if what == "<image>":
            return (
                f"Each image needs config.image_seq_length={self.config.image_seq_length} <image> tokens "
                "(the processor expands one <image> per image)."
            )
        return "Each <region> token takes the next region box, in order; pass one box per <region>."

    # ----- forward ------------------------------------------------------------------------------------------------

    def _is_prefill(self, cache: Cache | None) -> bool:
        return cache is None or cache.get_seq_length() == 0

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        region_boxes: RegionBoxes | None = None,
        region_image_index: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> CLOCLlavaModelOutputWithPast:
        """Fill ``<image>`` and ``<region>`` embeddings, then run the language model.

        Args:
            input_ids: ``(B, L)`` with ``image_seq_length`` ``<image>`` tokens per image and one ``<region>`` per box.
            pixel_values: ``(I, 3, S, S)`` preprocessed images, in the order of their ``<image>`` spans.
            region_boxes: model-frame ``xyxy`` boxes: ``(R, 4)`` with ``region_image_index`` ``(R,)``, or a list
                of ``(R_i, 4)`` per sample (sample ``i``'s boxes on image ``i``). See :func:`flatten_region_boxes`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        regions = flatten_region_boxes(region_boxes, region_image_index, inputs_embeds.device)

        image_features = region_features = None
        if pixel_values is not None:
            image_features, state = self.encode_images(pixel_values)
            mask = self.get_placeholder_mask(
                input_ids,
                inputs_embeds,
                self.config.image_token_id,
                image_features.shape[0] * image_features.shape[1],
                "<image>",
            )
            inputs_embeds = inputs_embeds.masked_scatter(
                mask, image_features.to(inputs_embeds.device, inputs_embeds.dtype)
            )
            region_features = self._region_features(input_ids, inputs_embeds, state, regions)
            if region_features is not None:
                mask = self.get_placeholder_mask(
                    input_ids, inputs_embeds, self.config.region_token_id, region_features.shape[0], "<region>"
                )
                inputs_embeds = inputs_embeds.masked_scatter(
                    mask, region_features.to(inputs_embeds.device, inputs_embeds.dtype)
                )
        elif regions is not None and regions[0].shape[0] > 0:
            raise ValueError("region_boxes were given without pixel_values: the prompter needs the images' features")
        elif input_ids is not None and self._is_prefill(cache):
            # In later decoding steps the images are in the cache; in the prefill they must be given.
            for token_id, what in ((self.config.image_token_id, "<image>"), (self.config.region_token_id, "<region>")):
                if (input_ids == token_id).any():
                    raise ValueError(f"the text has {what} tokens (id {token_id}) but no pixel_values")

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{CACHE_FIELD: cache},  # `past_key_values` before transformers 5.2x
            **kwargs,
        )
        return CLOCLlavaModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_features=image_features,
            region_features=region_features,
        )

    def _region_features(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        state: CLOCImageState,
        regions: tuple[torch.Tensor, torch.Tensor, list[int] | None] | None,
    ) -> torch.Tensor | None:
        """Region features in ``<region>`` order, after per-sample count checks; ``None`` when there are none."""
        region_token = self.config.region_token_id
        if regions is None:
            count = int((input_ids == region_token).sum()) if input_ids is not None else 0
            if count:
                raise ValueError(f"the text has {count} <region> tokens (id {region_token}) but no region_boxes")
            return None
        boxes, image_index, counts = regions
        if boxes.numel() and int(image_index.max()) >= state.num_images:
            raise ValueError(
                f"region_image_index refers to image {int(image_index.max())} but only "
                f"{state.num_images} images were given"
            )
        if counts is not None:
            if len(counts) != inputs_embeds.shape[0]:
                raise ValueError(f"region_boxes has {len(counts)} entries for a batch of {inputs_embeds.shape[0]}")
            if input_ids is not None:
                found = (input_ids == region_token).sum(dim=1).tolist()
                for sample, (have, want) in enumerate(zip(found, counts, strict=True)):
                    if have != want:
                        raise ValueError(
                            f"sample {sample}: {have} <region> tokens but {want} region boxes; "
                            f"{self._placeholder_hint('<region>')}"
                        )
        if boxes.shape[0] == 0 and (input_ids is None or not (input_ids == region_token).any()):
            return None
        return self.get_region_features(state, boxes, image_index)


class CLOCLlavaForConditionalGeneration(CLOCLlavaPreTrainedModel, GenerationMixin):
    """:class:`CLOCLlavaModel` + LM head; ``generate`` uses the images and regions in the prefill step only."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: CLOCLlavaConfig) -> None:
        super().__init__(config)
        self.model = CLOCLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image features ``(B, N, H)``."""
        return self.model.get_image_features(pixel_values)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        region_boxes: RegionBoxes | None = None,
        region_image_index: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CLOCLlavaCausalLMOutputWithPast:
        """As :meth:`CLOCLlavaModel.forward`; ``labels`` ``(B, L)`` (``-100`` = ignored) give the shifted LM loss."""
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            region_boxes=region_boxes,
            region_image_index=region_image_index,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return CLOCLlavaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_features=outputs.image_features,
            region_features=outputs.region_features,
        )

    def prepare_inputs_for_generation(self, *args: Any, is_first_iteration: bool | None = False, **kwargs: Any):
        """GenerationMixin's inputs; region boxes, like ``pixel_values``, only in the prefill step (or without a
        cache, when every step re-reads the whole sequence)."""
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in REGION_INPUTS:
                model_inputs.pop(key, None)
        return model_inputs

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids: torch.Tensor | None = None, **kwargs
    ):
        """Beam search / ``num_return_sequences``: expand region boxes so copy ``j`` of a sample points at copy
        ``j`` of its image (the generic expansion would repeat each box in place)."""
        boxes, index = kwargs.pop("region_boxes", None), kwargs.pop("region_image_index", None)
        input_ids, kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **kwargs
        )
        regions = flatten_region_boxes(boxes, index, self.device)
        if regions is not None and expand_size > 1:
            boxes, index, _ = regions
            boxes, index = expand_regions(boxes, index, expand_size)
        if boxes is not None:
            kwargs["region_boxes"], kwargs["region_image_index"] = boxes, index
        return input_ids, kwargs


__all__ = [
    "ROI_ALIGN_OUTPUT_SIZE",
    "CLOCLlavaCausalLMOutputWithPast",
    "CLOCLlavaForConditionalGeneration",
    "CLOCLlavaModel",
    "CLOCLlavaModelOutputWithPast",
    "CLOCLlavaPreTrainedModel",
    "CLOCLlavaProjector",
    "CLOCLlavaVisualFeatures",
    "roi_align_patch_features",
]
