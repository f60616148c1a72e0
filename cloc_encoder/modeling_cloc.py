"""The CLOC encoder: CLIP/SigLIP towers + region prompter + box head, with the CLOC training losses.

Typical use ("encode once, prompt many")::

    state = model.encode_images(pixel_values)                       # one ViT pass
    regions = model.region_embeddings(state, boxes, image_index)    # any number of boxes per image
    texts = model.encode_text(input_ids, attention_mask).text_embeds
    boxes = model.predict_boxes(state, texts, image_index)          # text -> box

All boxes here are in the model frame (``xyxy`` normalised over the preprocessed image); the image processor maps
them from and to the original image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    CLIPTextModel,
    CLIPVisionModel,
    PreTrainedModel,
    SiglipTextModel,
    SiglipVisionModel,
)
from transformers import initialization as init
from transformers.utils import ModelOutput

from cloc_encoder.configuration_cloc import CLOCConfig
from cloc_encoder.losses import (
    CLOCLossOutput,
    _world,
    clip_sigmoid_loss,
    clip_softmax_loss,
    grounding_loss,
    region_text_loss,
)
from cloc_encoder.prompter import BoxHead, RegionPrompter

TOWER_CLASSES = {
    "clip_vision_model": CLIPVisionModel,
    "clip_text_model": CLIPTextModel,
    "siglip_vision_model": SiglipVisionModel,
    "siglip_text_model": SiglipTextModel,
}


@dataclass
class CLOCImageState:
    """What one ViT pass leaves for prompting.

    Attributes:
        patch_tokens: ``(B, P, W)`` the ViT's last-layer tokens before pooling, projection and final norm
            (``f_I'(x)``), with the CLS token only when ``config.prompter_include_cls``.
        image_embeds: ``(B, D)`` global image embeddings (not normalised).
        hidden_states: every layer's hidden states (for MLLM feature selection), when requested.
    """

    patch_tokens: torch.Tensor
    image_embeds: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    key_values: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_images(self) -> int:
        return self.patch_tokens.shape[0]


@dataclass
class CLOCTextOutput(ModelOutput):
    """``text_embeds`` ``(N, D)`` (not normalised) and the tower's ``pooled`` output ``(N, D_text)``."""

    text_embeds: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


@dataclass
class CLOCOutput(ModelOutput):
    """Forward output; embeddings are L2-normalised."""

    loss: torch.Tensor | None = None
    loss_clip: torch.Tensor | None = None
    loss_region: torch.Tensor | None = None
    loss_grounding: torch.Tensor | None = None
    region_weight: float | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    region_embeds: torch.Tensor | None = None
    region_text_embeds: torch.Tensor | None = None
    predicted_boxes: torch.Tensor | None = None


def sincos_2d_position_table(grid_size: int, dim: int, cls_token: bool = False) -> torch.Tensor:
    """MAE's fixed 2D sin-cos position table for a ``grid_size × grid_size`` patch grid: ``(grid², dim)`` in raster
    order (a zero row first with ``cls_token``). The first half of the channels encodes the column, the second the
    row, each as ``[sin(p·ω), cos(p·ω)]`` with ``ω_k = 10000^(-k / (dim/4))``; ``dim`` must be divisible by 4."""
    if dim % 4:
        raise ValueError(f"a 2D sin-cos position table needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    positions = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(positions, positions, indexing="ij")

    def encode(values: torch.Tensor) -> torch.Tensor:
        angles = values.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1).float()
    return torch.cat([torch.zeros(1, dim), table]) if cls_token else table


class CLOCPreTrainedModel(PreTrainedModel):
    config_class = CLOCConfig
    config: CLOCConfig
    base_model_prefix = "cloc"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["CLIPEncoderLayer", "SiglipEncoderLayer", "RegionPrompter"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise CLOC's own modules; the towers are sub-models and initialise themselves."""
        std = 0.02 * self.config.initializer_factor
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, RegionPrompter):
            init.normal_(module.corner_embeddings, mean=0.0, std=std)
        elif isinstance(module, CLOCModel):
            if self.config.vision_position_init == "sincos2d":
                embedding = module.vision_model.embeddings.position_embedding
                patches = self.config.patch_grid_size
                table = sincos_2d_position_table(
                    patches, embedding.embedding_dim, embedding.num_embeddings > patches**2
                )
                init.copy_(embedding.weight, table.to(embedding.weight.dtype))
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            init.constant_(module.region_logit_scale, self._region_logit_scale_init())
            if module.logit_bias is not None:
                init.constant_(module.logit_bias, self.config.logit_bias_init_value)

    def _region_logit_scale_init(self) -> float:
        value = self.config.region_logit_scale_init_value
        return self.config.logit_scale_init_value if value is None else value


class CLOCModel(CLOCPreTrainedModel):
    """CLOC encoder. Parameter names of the towers match transformers' ``CLIPModel``/``SiglipModel``."""

    def __init__(self, config: CLOCConfig) -> None:
        super().__init__(config)
        self.vision_model = TOWER_CLASSES[config.vision_config.model_type]._from_config(config.vision_config)
        self.text_model = TOWER_CLASSES[config.text_config.model_type]._from_config(config.text_config)
        if config.has_projection_layers:
            self.visual_projection = nn.Linear(config.vision_width, config.projection_dim, bias=False)
            self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        else:
            self.visual_projection = None
            self.text_projection = None
        # Scalar shapes follow the source checkpoints: () in CLIPModel, (1,) in SiglipModel.
        scalar_shape = () if config.backbone == "clip" else (1,)
        self.logit_scale = nn.Parameter(torch.full(scalar_shape, float(config.logit_scale_init_value)))
        self.region_logit_scale = nn.Parameter(torch.full(scalar_shape, float(self._region_logit_scale_init())))
        uses_bias = config.backbone == "siglip" or config.contrastive_loss == "sigmoid"
        self.logit_bias = (
            nn.Parameter(torch.full(scalar_shape, float(config.logit_bias_init_value))) if uses_bias else None
        )
        self.prompter = RegionPrompter(config)
        box_input = config.vision_width if config.box_head_input == "pooled" else config.projection_dim
        box_input += 4 if config.box_head_attention_geometry else 0
        self.box_head = BoxHead(box_input, config.box_head_hidden_size or config.vision_width)
        self.post_init()

    # ----- towers -----------------------------------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> CLOCImageState:
        """One ViT pass: ``(B, 3, S, S)`` → :class:`CLOCImageState`."""
        outputs = self.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        tokens = outputs.hidden_states[-1]  # last layer, before any final norm (CLIP and SigLIP alike)
        if self.config.has_cls_token and not self.config.prompter_include_cls:
            tokens = tokens[:, 1:]
        image_embeds = outputs.pooler_output
        if self.visual_projection is not None:
            image_embeds = self.visual_projection(image_embeds)
        return CLOCImageState(
            patch_tokens=tokens,
            image_embeds=image_embeds,
            hidden_states=tuple(outputs.hidden_states) if output_hidden_states else None,
        )

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CLOCTextOutput:
        """Token ids ``(N, L)`` → text embeddings ``(N, D)`` and the tower's pooled output."""
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        embeds = self.text_projection(pooled) if self.text_projection is not None else pooled
        return CLOCTextOutput(text_embeds=embeds, pooled=pooled)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Same values as ``CLIPModel.get_image_features(...).pooler_output``: ``(B, D)``."""
        return self.encode_images(pixel_values).image_embeds

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Same values as ``CLIPModel.get_text_features(...).pooler_output``: ``(N, D)``."""
        return self.encode_text(input_ids, attention_mask).text_embeds

    # ----- prompting --------------------------------------------------------------------------------------------

    def _key_values(self, state: CLOCImageState) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.config.prompter_pool != "prompts":
            return None
        if state.key_values is None:
            state.key_values = self.prompter.layer.image_key_values(state.patch_tokens)
        return state.key_values

    def region_features(
        self, state: CLOCImageState, boxes: torch.Tensor, image_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled prompter outputs ``(R, W)`` and region embeddings ``(R, D)`` for model-frame boxes ``(R, 4)``."""
        return self.prompter.box_features(boxes, state.patch_tokens, image_index, self._key_values(state))

    def region_embeddings(
        self,
        state: CLOCImageState,
        boxes: torch.Tensor | list[torch.Tensor],
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Region embeddings ``(R, D)`` (not normalised) for any number of boxes per image, in one batched call.

        ``boxes`` is either ``(R, 4)`` model-frame ``xyxy`` with ``image_index`` ``(R,)``, or a list with one
        ``(R_i, 4)`` tensor per image (then regions come out image by image).
        """
        boxes, image_index = flatten_boxes(boxes, image_index, state.num_images)
        return self.region_features(state, boxes, image_index)[1]

    def predict_boxes(
        self, state: CLOCImageState, text_vectors: torch.Tensor, image_index: torch.Tensor
    ) -> torch.Tensor:
        """Text → box. ``text_vectors``: ``(R, ·)`` text embeddings (or pooled outputs when
        ``config.text_prompt_input == "pooled"``); returns ``(R, 4)`` model-frame ``xyxy``."""
        if self.config.text_prompt_input == "embedding":
            text_vectors = F.normalize(text_vectors, dim=-1)
        pooled, geometry = self.prompter.text_features(
            text_vectors, state.patch_tokens, image_index, self._key_values(state)
        )
        features = pooled if self.config.box_head_input == "pooled" else self.prompter.embed(pooled)
        if self.config.box_head_attention_geometry:
            features = torch.cat([features, geometry.to(features.dtype)], dim=-1)
        return self.box_head(features)

    # ----- training forward -------------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        region_boxes: torch.Tensor | None = None,
        region_image_index: torch.Tensor | None = None,
        region_input_ids: torch.Tensor | None = None,
        region_attention_mask: torch.Tensor | None = None,
        return_loss: bool = True,
    ) -> CLOCOutput:
        """CLOC training step inputs → losses and normalised embeddings.

        Args:
            pixel_values: ``(N, 3, S, S)`` preprocessed images.
            input_ids, attention_mask: ``(N, L)`` whole-image captions.
            region_boxes: ``(R, 4)`` model-frame ``xyxy`` (up to ``max_regions_per_image`` per image).
            region_image_index: ``(R,)`` image of each region.
            region_input_ids, region_attention_mask: ``(R, L)`` region captions.
        """
        state = self.encode_images(pixel_values)
        num_regions = 0 if region_boxes is None else region_boxes.shape[0]
        # The region losses gather across ranks, so with several ranks a batch without regions still runs the
        # (empty) region path and joins the collectives; skipping it would leave the other ranks waiting.
        has_regions = region_boxes is not None and region_input_ids is not None and (num_regions or _world()[1] > 1)
        if has_regions and region_input_ids.shape[1] == input_ids.shape[1]:
            # One text-tower pass for image and region captions.
            texts = self.encode_text(
                torch.cat([input_ids, region_input_ids]),
                None if attention_mask is None else torch.cat([attention_mask, region_attention_mask]),
            )
            text_embeds, region_text_embeds = texts.text_embeds.split([input_ids.shape[0], num_regions])
            region_text_vectors = texts.pooled[input_ids.shape[0] :]
        else:
            text_embeds = self.encode_text(input_ids, attention_mask).text_embeds
            region_text_embeds = region_text_vectors = None
            if has_regions:
                region_texts = self.encode_text(region_input_ids, region_attention_mask)
                region_text_embeds, region_text_vectors = region_texts.text_embeds, region_texts.pooled

        image_embeds = F.normalize(state.image_embeds, dim=-1)
        text_embeds = F.normalize(text_embeds, dim=-1)
        output = CLOCOutput(image_embeds=image_embeds, text_embeds=text_embeds)
        if has_regions:
            region_embeds = F.normalize(self.region_features(state, region_boxes, region_image_index)[1], dim=-1)
            prompt_vectors = region_text_embeds if self.config.text_prompt_input == "embedding" else region_text_vectors
            output.predicted_boxes = self.predict_boxes(state, prompt_vectors, region_image_index)
            output.region_embeds = region_embeds
            output.region_text_embeds = F.normalize(region_text_embeds, dim=-1)
        if return_loss:
            losses = self.compute_loss(output, region_boxes, region_image_index, pixel_values.shape[0])
            output.loss, output.loss_clip = losses.total, losses.clip
            output.loss_region, output.loss_grounding = losses.region, losses.grounding
            output.region_weight = losses.region_weight
        return output

    def compute_loss(
        self,
        output: CLOCOutput,
        region_boxes: torch.Tensor | None,
        region_image_index: torch.Tensor | None,
        batch_size: int,
    ) -> CLOCLossOutput:
        """``L_CLIP + λ (L_CLOC + w · L_grounding)`` with ``λ`` = share of images in the batch that have regions."""
        if self.config.contrastive_loss == "sigmoid":
            clip = clip_sigmoid_loss(output.image_embeds, output.text_embeds, self.logit_scale, self.logit_bias)
        else:
            clip = clip_softmax_loss(output.image_embeds, output.text_embeds, self.logit_scale)
        zero = clip.new_zeros(())
        if region_boxes is None or output.region_embeds is None:
            # Keep every region parameter in the graph (DDP / ZeRO expect gradients for all of them).
            unused = sum(p.sum() for p in (*self.prompter.parameters(), *self.box_head.parameters())) * 0.0
            region = grounding = zero + unused
            region_weight = 0.0
        else:
            region = region_text_loss(
                output.region_embeds,
                output.region_text_embeds,
                self.region_logit_scale,
                self.config.region_negative_threshold,
            )
            grounding = grounding_loss(
                output.predicted_boxes, region_boxes, self.config.max_regions_per_image, batch_size
            )
            region_weight = float(region_image_index.unique().numel()) / batch_size
        total = clip + region_weight * (region + self.config.grounding_weight * grounding)
        return CLOCLossOutput(total=total, clip=clip, region=region, grounding=grounding, region_weight=region_weight)


def flatten_boxes(
    boxes: torch.Tensor | list[torch.Tensor], image_index: torch.Tensor | None, num_images: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise the two box layouts to ``(R, 4)`` boxes + ``(R,)`` image index, checking shapes."""
    if isinstance(boxes, (list, tuple)):
        if len(boxes) != num_images:
            raise ValueError(f"got boxes for {len(boxes)} images but the image state holds {num_images}")
        counts = [len(b) for b in boxes]
        device = boxes[0].device if boxes else torch.device("cpu")
        image_index = torch.repeat_interleave(
            torch.arange(num_images, device=device), torch.tensor(counts, device=device)
        )
        boxes = torch.cat([torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]) if boxes else boxes
    elif image_index is None:
        raise ValueError("region_embeddings needs image_index (R,) when boxes is a single (R, 4) tensor")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (R, 4) xyxy, got shape {tuple(boxes.shape)}")
    if image_index.shape != boxes.shape[:1]:
        raise ValueError(f"image_index shape {tuple(image_index.shape)} does not match {boxes.shape[0]} boxes")
    if boxes.numel() and int(image_index.max()) >= num_images:
        raise ValueError(f"image_index refers to image {int(image_index.max())} but only {num_images} were encoded")
    return boxes, image_index.long()
