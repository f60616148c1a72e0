"""The MLLM's vision tower: the image half of a CLOC encoder (ViT + prompter), without the text tower.

A LLaVA-style model needs the ViT (image features) and the prompter (region features for ``<region>`` tokens).
CLOC's text tower, contrastive projections, temperatures and box head are not used, so they are not built: an
MLLM checkpoint does not carry a dead text tower. (The prompter keeps its small text-prompt projection, and its
region-embedding projection is unused with ``region_feature="pooled"``: freeze them, or let DDP find unused
parameters, when training the prompter.)

Parameter names equal :class:`~cloc_encoder.CLOCModel`'s (``vision_model.*``, ``prompter.*``), so the key mapping
from a CLOC checkpoint is the identity on those prefixes; every other CLOC key is dropped
(:data:`DROPPED_CLOC_PREFIXES`). Within the MLLM the tower sits at ``model.vision_tower``, so a CLIP ViT from a
llava-hf checkpoint (``model.vision_tower.vision_model.*``) also keeps its names.
"""

from __future__ import annotations

import os
import re

import torch
from transformers import CLIPVisionModel, SiglipVisionModel

from cloc_encoder import CLOCConfig, CLOCImageState, CLOCModel, CLOCPreTrainedModel
from cloc_encoder.prompter import RegionPrompter

VISION_TOWER_CLASSES = {"clip_vision_model": CLIPVisionModel, "siglip_vision_model": SiglipVisionModel}
DROPPED_CLOC_PREFIXES = ("text_model.", "visual_projection.", "text_projection.", "box_head.")
DROPPED_CLOC_KEYS = ("logit_scale", "region_logit_scale", "logit_bias")


class CLOCVisionTower(CLOCPreTrainedModel):
    """ViT + CLOC prompter. Boxes are model-frame ``xyxy`` (normalised over the preprocessed ``S×S`` input)."""

    # The attention layers are CLIP's / SigLIP's; the prompter uses plain SDPA whatever is requested.
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # A CLOC checkpoint's text tower, projections and box head are dropped silently (anchored: only top-level keys
    # of a CLOC folder match, never keys of the MLLM that holds this tower).
    _keys_to_ignore_on_load_unexpected = [rf"^{re.escape(prefix)}" for prefix in DROPPED_CLOC_PREFIXES] + [
        rf"^{re.escape(key)}$" for key in DROPPED_CLOC_KEYS
    ]

    def __init__(self, config: CLOCConfig) -> None:
        super().__init__(config)
        self.vision_model = VISION_TOWER_CLASSES[config.vision_config.model_type]._from_config(config.vision_config)
        self.prompter = RegionPrompter(config)
        self.post_init()

    def encode_images(self, pixel_values: torch.Tensor) -> CLOCImageState:
        """One ViT pass: ``(B, 3, S, S)`` → state with ``patch_tokens`` ``(B, P, W)`` (last layer, before the final
        norm, CLS dropped unless ``prompter_include_cls``: what the prompter reads), ``hidden_states`` (every
        layer, for the MLLM's feature layer) and ``image_embeds`` = the tower's pooled output ``(B, W)``
        (unprojected: the tower has no contrastive projection)."""
        outputs = self.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        tokens = outputs.hidden_states[-1]
        if self.config.has_cls_token and not self.config.prompter_include_cls:
            tokens = tokens[:, 1:]
        return CLOCImageState(
            patch_tokens=tokens, image_embeds=outputs.pooler_output, hidden_states=tuple(outputs.hidden_states)
        )

    def region_features(
        self, state: CLOCImageState, boxes: torch.Tensor, image_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled prompter outputs ``(R, W)`` and region embeddings ``(R, D)`` for model-frame boxes ``(R, 4)``
        on images ``image_index`` ``(R,)`` — the same values as :meth:`CLOCModel.region_features`."""
        key_values = None
        if self.config.prompter_pool == "prompts":
            if state.key_values is None:
                state.key_values = self.prompter.layer.image_key_values(state.patch_tokens)
            key_values = state.key_values
        return self.prompter.box_features(boxes, state.patch_tokens, image_index, key_values)

    @classmethod
    def from_cloc(cls, source: CLOCModel | str | os.PathLike[str], **kwargs) -> CLOCVisionTower:
        """The vision tower of a CLOC encoder (a :class:`CLOCModel` or a saved CLOC checkpoint folder).

        Raises when ViT or prompter weights are missing; the text tower, projections and box head are dropped.
        ``kwargs`` go to ``from_pretrained`` (``dtype``, ``device_map``, ...).
        """
        if isinstance(source, CLOCModel):
            tower = cls(source.config)
            state = {k: v for k, v in source.state_dict().items() if k.startswith(("vision_model.", "prompter."))}
            tower.load_state_dict(state, strict=True)
            return tower.to(source.dtype)
        tower, info = cls.from_pretrained(source, output_loading_info=True, **kwargs)
        missing = list(info.get("missing_keys", []))
        unexpected = [
            k
            for k in info.get("unexpected_keys", [])
            if not (k.startswith(DROPPED_CLOC_PREFIXES) or k in DROPPED_CLOC_KEYS or k.endswith("position_ids"))
        ]
        if missing or unexpected:
            raise ValueError(
                f"{source}: not a CLOC encoder checkpoint (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        return tower


__all__ = ["DROPPED_CLOC_PREFIXES", "CLOCVisionTower"]
