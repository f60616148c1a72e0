"""Configuration of the CLOC-LLaVA model: a CLOC encoder + projectors + any causal language model."""

from __future__ import annotations

from typing import Literal

from transformers import AutoConfig, PreTrainedConfig

from cloc_encoder import CLOCConfig
from cloc_encoder.compat import HAS_SUB_CONFIG_SPECS, build_sub_configs, sub_config_specs
from mllm.box_codec import BOX_CODECS, DEFAULT_BOX_CODEC

PROJECTOR_TYPES = ("mlp2x_gelu", "linear")
REGION_FEATURES = ("pooled", "embedding", "roi_align")
FEATURE_SELECT_STRATEGIES = ("default", "full")


class CLOCLlavaConfig(PreTrainedConfig):
    r"""Configuration of :class:`~mllm.CLOCLlavaForConditionalGeneration`.

    Args:
        vision_config: a :class:`~cloc_encoder.CLOCConfig` (or its dict); the vision tower and the prompter.
        text_config: any causal LM config (dict with ``model_type``, or a config); default ``llama``.
        projector_type: image projector, vision width → LLM hidden size: ``"mlp2x_gelu"`` (LLaVA-1.5) or
            ``"linear"`` (LLaVA-1).
        region_projector_type: region projector (prompter output → LLM hidden size), same choices.
        region_feature: what feeds the region projector: ``"pooled"`` (the pooled prompter output at ViT width
            ``W``), ``"embedding"`` (the prompter's region embedding at CLOC's projection size ``D``), or
            ``"roi_align"`` (no prompter: the patch tokens of ``vision_feature_layer`` RoI-aligned over the box and
            averaged, the image features' width, as Ferret / GLaMM build region features from a CLIP tower).
        vision_feature_layer: ViT hidden-state index for image features (``-2`` as LLaVA, ``-1`` = last layer;
            hidden state 0 is the embeddings), or a list of indices whose hidden states are concatenated along the
            channels (transformers' LLaVA convention; the image projector then reads ``len(list) · W``). The
            prompter always reads the last layer, as CLOC trained it; ``region_feature="roi_align"`` reads these.
        vision_feature_select_strategy: ``"default"`` drops the CLS token (patch tokens only), ``"full"`` keeps it.
            Towers without a CLS token (SigLIP) give the same features either way.
        image_token_id, region_token_id: ids of the ``<image>`` and ``<region>`` placeholder tokens.
        box_codec: name of the box⇄text codec in :data:`mllm.box_codec.BOX_CODECS` (``"int999"`` or ``"float"``).
        image_token_merge: side ``m`` of the square of neighbouring patches merged into one image token before the
            image projector (1: one token per patch, as LLaVA). Each ``m × m`` block's features are concatenated
            along the channels (the projector reads ``m² · W`` per feature layer), so the LLM sees ``P / m²``
            image tokens that keep every patch's feature (InternVL's pixel shuffle, Qwen2-VL's spatial merge). The
            patch grid's side must be a multiple of ``m``, and the CLS token cannot be kept with ``m > 1``.
        image_seq_length: ``<image>`` tokens per image; derived from the vision config when ``None``.
        multimodal_projector_bias: whether the projectors' linear layers have biases.
    """

    model_type = "cloc_llava"
    attribute_map = {"image_token_index": "image_token_id"}
    _sub_config_specs = {"vision_config": (CLOCConfig, None), "text_config": (AutoConfig, "llama")}
    if HAS_SUB_CONFIG_SPECS:
        sub_configs_defaults = sub_config_specs(_sub_config_specs)
    else:  # older transformers: built in __post_init__
        sub_configs = sub_config_specs(_sub_config_specs)

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_type: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    region_projector_type: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    region_feature: Literal["pooled", "embedding", "roi_align"] = "pooled"
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    image_token_id: int = 32000
    region_token_id: int = 32001
    box_codec: str = DEFAULT_BOX_CODEC
    image_token_merge: int = 1
    image_seq_length: int | None = None
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        build_sub_configs(self, self._sub_config_specs)
        super().__post_init__(**kwargs)
        for name, allowed in (
            ("projector_type", PROJECTOR_TYPES),
            ("region_projector_type", PROJECTOR_TYPES),
            ("region_feature", REGION_FEATURES),
            ("vision_feature_select_strategy", FEATURE_SELECT_STRATEGIES),
            ("box_codec", tuple(BOX_CODECS)),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"CLOCLlavaConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")
        num_layers = self.vision_config.vision_config.num_hidden_layers
        layers = self.feature_layers if isinstance(self.vision_feature_layer, (int, list, tuple)) else [None]
        if not layers or not all(
            isinstance(layer, int) and not isinstance(layer, bool) and -(num_layers + 1) <= layer <= num_layers
            for layer in layers
        ):
            raise ValueError(
                f"CLOCLlavaConfig.vision_feature_layer={self.vision_feature_layer!r} is not a hidden-state index of a "
                f"{num_layers}-layer ViT; expected an int in [{-(num_layers + 1)}, {num_layers}] or a list of them"
            )
        if isinstance(self.vision_feature_layer, tuple):
            self.vision_feature_layer = list(self.vision_feature_layer)
        if self.image_token_id == self.region_token_id:
            raise ValueError(
                f"CLOCLlavaConfig.region_token_id={self.region_token_id} equals image_token_id; they must differ"
            )
        grid = self.vision_config.patch_grid_size
        merge = self.image_token_merge
        if isinstance(merge, bool) or not isinstance(merge, int) or merge < 1 or grid % merge:
            raise ValueError(
                f"CLOCLlavaConfig.image_token_merge={merge!r}: expected a positive int dividing the {grid} x {grid} "
                "patch grid"
            )
        if merge > 1 and self.vision_feature_select_strategy == "full" and self.vision_config.has_cls_token:
            raise ValueError(
                "CLOCLlavaConfig.image_token_merge > 1 merges patches only; use vision_feature_select_strategy "
                "'default' (the CLS token cannot be merged)"
            )
        expected = self.num_image_features
        if self.image_seq_length is None:
            self.image_seq_length = expected
        elif self.image_seq_length != expected:
            raise ValueError(
                f"CLOCLlavaConfig.image_seq_length={self.image_seq_length} but the vision tower gives {expected} "
                f"features per image ({self.vision_config.num_patches} patches, "
                f"vision_feature_select_strategy={self.vision_feature_select_strategy!r}, "
                f"image_token_merge={self.image_token_merge}); leave it None"
            )
        # LLaVA's workaround: checkpoints record tying in the text config.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    @property
    def num_image_features(self) -> int:
        """Visual tokens per image: patches (``P / image_token_merge²``), plus the CLS token with ``"full"`` on a
        tower that has one."""
        keeps_cls = self.vision_feature_select_strategy == "full" and self.vision_config.has_cls_token
        return self.vision_config.num_patches // self.image_token_merge**2 + int(keeps_cls)

    @property
    def image_token_grid_size(self) -> int:
        """Image tokens per side of the image-token grid (patch tokens, raster order): the patch grid's side over
        ``image_token_merge``."""
        return self.vision_config.patch_grid_size // self.image_token_merge

    @property
    def feature_layers(self) -> list[int]:
        """The hidden-state indices of the image features (``vision_feature_layer`` as a list)."""
        layer = self.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    @property
    def image_feature_size(self) -> int:
        """Width of one patch's image feature: ViT width ``W`` per feature layer (what ``"roi_align"`` pools)."""
        return self.vision_config.vision_width * len(self.feature_layers)

    @property
    def image_projector_input_size(self) -> int:
        """Width the image projector reads: :attr:`image_feature_size` times ``image_token_merge²``."""
        return self.image_feature_size * self.image_token_merge**2

    @property
    def region_feature_size(self) -> int:
        """Width of the region feature the region projector reads: ``D`` for ``"embedding"``, the image features'
        width for ``"roi_align"``, else ViT width ``W``."""
        if self.region_feature == "embedding":
            return self.vision_config.projection_dim
        if self.region_feature == "roi_align":
            return self.image_feature_size
        return self.vision_config.vision_width


__all__ = ["CLOCLlavaConfig"]
