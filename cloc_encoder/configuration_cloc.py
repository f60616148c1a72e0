"""Configuration of the CLOC encoder: a CLIP/SigLIP two-tower backbone plus the prompter and box head."""

from __future__ import annotations

from typing import Literal

from transformers import AutoConfig, PreTrainedConfig

from cloc_encoder.compat import HAS_SUB_CONFIG_SPECS, build_sub_configs, sub_config_specs

BACKBONES = {
    # vision model_type -> (backbone name, text model_type, has a CLS token, has projection layers)
    "clip_vision_model": ("clip", "clip_text_model", True, True),
    "siglip_vision_model": ("siglip", "siglip_text_model", False, False),
}
PROMPTER_POOLS = ("prompts", "all")
VISION_POSITION_INITS = ("random", "sincos2d")
PROMPTER_KEY_POSITIONS = ("none", "sinusoidal")
TEXT_PROMPT_INPUTS = ("embedding", "pooled")
BOX_HEAD_INPUTS = ("pooled", "embedding")
CONTRASTIVE_LOSSES = ("softmax", "sigmoid")


class CLOCConfig(PreTrainedConfig):
    r"""Configuration of :class:`~cloc_encoder.CLOCModel`.

    The backbone (``vision_config``/``text_config``) is an OpenAI-CLIP layout (``clip_vision_model`` +
    ``clip_text_model``) or SigLIP (``siglip_vision_model`` + ``siglip_text_model``); the backbone kind is read from
    ``vision_config.model_type``, never from a model name.

    Prompter fields (paper: two sinusoidal corner tokens → one single-head transformer layer of ViT width over
    ``[prompts; patch tokens]`` → global average pool → linear projection):

    - ``prompter_pool``: what the average pool runs over: ``"prompts"`` (only the prompt positions; the default,
      measured to learn region alignment far faster and allowing the shared key/value fast path) or ``"all"``.
    - ``prompter_num_frequencies``: sinusoid frequencies per coordinate (``2·F`` features per coordinate).
    - ``prompter_max_frequency``: highest frequency, in cycles over the unit interval (geometric spacing from 1).
    - ``prompter_mlp_ratio``: MLP width of the prompter layer as a multiple of ViT width.
    - ``prompter_key_positions``: ``"sinusoidal"`` adds the patch centres' sinusoidal encoding (same settings as the
      corner tokens; own linear map to ViT width, then the layer's first LayerNorm) to the image tokens' key inputs,
      so corner queries can match positions from the start (as SAM adds its dense positional encoding to the image
      keys); ``"none"`` (default) uses the patch tokens alone. Values are left unchanged. Measured on the synthetic
      world (450 steps, batch 64): without the box attention bias it lifts region classification from ~25% to 37-57%
      (71-74% at 900 steps); with the bias at 4.0 it adds nothing (76% vs 79%), so it is off by default.
    - ``prompter_box_attention_bias``: added to a box prompt's attention logits for the image tokens whose patch
      centre lies inside the box (a soft RoI prior, like an ALiBi-style bias; 0 disables it). Without it the
      attention starts uniform and stayed image-level on the synthetic world (region classification 25% after 600
      steps); with 4.0 it reached 65% after 150 steps and 88% after 600 (docs/benchmarks.md). Text prompts get none.
    - ``prompter_include_cls``: whether the ViT's CLS token joins the patch tokens the prompter attends to.
    - ``prompter_pool_norm``: LayerNorm after pooling, before the projection (as CLIP's ``post_layernorm``).
    - ``text_prompt_input``: which text vector becomes the text prompt token: ``"embedding"`` (the projected,
      normalised text embedding) or ``"pooled"`` (the text tower's pooled output before projection).
    - ``box_head_input``: what the box head reads: ``"pooled"`` (prompter output at ViT width) or ``"embedding"``.
    - ``box_head_attention_geometry``: the box head also reads where the text prompt's attention falls (mean and
      spread of the patch centres under it, 4 numbers), so the grounding loss trains the attention directly.
      Measured on the synthetic world (batch 64, grounding weight 10): without it text→box Acc@0.5 stayed at 2-3%
      for 900 steps even with 86% region classification; with it 10% at 450 steps and 13% at 600, loss falling.
    - ``box_head_hidden_size``: hidden width of the 2-layer GELU MLP (defaults to ViT width).
    - ``vision_position_init``: how a new ViT's learned position embeddings start: ``"random"`` (CLIP's and
      SigLIP's normal init, std 0.02) or ``"sincos2d"`` (MAE's fixed 2D sin-cos table, then trained). With the
      random init the patch features of the tiny encoder carry little position (a linear probe recovers a patch's
      row/column with R² 0.14-0.21 after 450 steps), which an MLLM needs to write boxes; a ViT loaded from a
      checkpoint keeps its own embeddings.

    Loss fields: ``contrastive_loss`` (``"softmax"`` InfoNCE or SigLIP's ``"sigmoid"``), ``region_negative_threshold``
    (caption-caption cosine above which a negative is masked out of the region-text denominator, paper 0.9),
    ``grounding_weight`` (multiplies ``L_grounding`` inside ``λ (L_CLOC + w·L_grounding)``; paper 1.0) and
    ``max_regions_per_image`` (M, paper 4).
    """

    model_type = "cloc"
    _sub_config_specs = {
        "vision_config": (AutoConfig, "clip_vision_model"),
        "text_config": (AutoConfig, "clip_text_model"),
    }
    if HAS_SUB_CONFIG_SPECS:
        sub_configs_defaults = sub_config_specs(_sub_config_specs)
    else:  # older transformers: built in __post_init__
        sub_configs = sub_config_specs(_sub_config_specs)

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    logit_bias_init_value: float = -10.0
    region_logit_scale_init_value: float | None = None
    prompter_pool: Literal["prompts", "all"] = "prompts"
    prompter_num_frequencies: int = 32
    prompter_max_frequency: float = 64.0
    prompter_mlp_ratio: float = 4.0
    prompter_key_positions: Literal["none", "sinusoidal"] = "none"
    prompter_box_attention_bias: float = 4.0
    prompter_include_cls: bool = False
    prompter_pool_norm: bool = True
    text_prompt_input: Literal["embedding", "pooled"] = "embedding"
    box_head_input: Literal["pooled", "embedding"] = "pooled"
    box_head_attention_geometry: bool = True
    box_head_hidden_size: int | None = None
    contrastive_loss: Literal["softmax", "sigmoid"] = "softmax"
    region_negative_threshold: float = 0.9
    grounding_weight: float = 1.0
    max_regions_per_image: int = 4
    vision_position_init: Literal["random", "sincos2d"] = "random"
    initializer_factor: float = 1.0

    def __post_init__(self, **kwargs):
        build_sub_configs(self, self._sub_config_specs)
        super().__post_init__(**kwargs)
        vision_type = self.vision_config.model_type
        if vision_type not in BACKBONES:
            raise ValueError(
                f"CLOCConfig.vision_config.model_type={vision_type!r} is not supported; use one of {sorted(BACKBONES)}"
            )
        expected_text = BACKBONES[vision_type][1]
        if self.text_config.model_type != expected_text:
            raise ValueError(
                f"CLOCConfig.text_config.model_type={self.text_config.model_type!r} does not match the vision tower "
                f"{vision_type!r}; expected {expected_text!r}"
            )
        for name, allowed in (
            ("prompter_pool", PROMPTER_POOLS),
            ("prompter_key_positions", PROMPTER_KEY_POSITIONS),
            ("text_prompt_input", TEXT_PROMPT_INPUTS),
            ("box_head_input", BOX_HEAD_INPUTS),
            ("contrastive_loss", CONTRASTIVE_LOSSES),
            ("vision_position_init", VISION_POSITION_INITS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"CLOCConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.prompter_box_attention_bias < 0:
            raise ValueError(
                f"CLOCConfig.prompter_box_attention_bias={self.prompter_box_attention_bias}; expected >= 0 (0 disables)"
            )
        if not self.has_projection_layers:
            # SigLIP towers end in their own heads; the embedding size is the tower width.
            self.projection_dim = self.vision_config.hidden_size

    @property
    def backbone(self) -> str:
        """``"clip"`` or ``"siglip"``, read from ``vision_config.model_type``."""
        return BACKBONES[self.vision_config.model_type][0]

    @property
    def has_cls_token(self) -> bool:
        return BACKBONES[self.vision_config.model_type][2]

    @property
    def has_projection_layers(self) -> bool:
        return BACKBONES[self.vision_config.model_type][3]

    @property
    def vision_width(self) -> int:
        return self.vision_config.hidden_size

    @property
    def patch_grid_size(self) -> int:
        """Patches per side of the (square) patch grid."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def num_patches(self) -> int:
        return self.patch_grid_size**2


__all__ = ["CLOCConfig"]
