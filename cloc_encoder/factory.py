"""Build CLOC encoders from named size presets or from local CLIP/SigLIP checkpoints.

Presets are keyed by their name in :data:`PRESETS` (a config value), never by substrings of a model name.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from transformers import AutoConfig, PreTrainedTokenizerBase

from cloc_encoder.configuration_cloc import CLOCConfig
from cloc_encoder.modeling_cloc import CLOCModel
from cloc_encoder.tokenization import text_config_token_ids

PRESETS: dict[str, dict[str, Any]] = {
    # 64-px images, 8-px patches: the synthetic-world model used by tests and the README's main job.
    "tiny": {
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
        },
        "text_config": {
            "model_type": "clip_text_model",
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
        },
        "projection_dim": 128,
    },
    "tiny-siglip": {
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
        },
        "text_config": {
            "model_type": "siglip_text_model",
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
        },
        "contrastive_loss": "sigmoid",
    },
    # OpenAI ViT-B/16 sizes (224 px): used by the speed benchmark.
    "vit-b-16": {
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 16,
        },
        "text_config": {
            "model_type": "clip_text_model",
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "max_position_embeddings": 77,
        },
        "projection_dim": 512,
    },
    # OpenAI ViT-L/14 at 336 px: the LLaVA-1.5 vision tower size.
    "vit-l-14-336": {
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 336,
            "patch_size": 14,
        },
        "text_config": {
            "model_type": "clip_text_model",
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
        },
        "projection_dim": 768,
    },
}


def preset_config(name: str, tokenizer: PreTrainedTokenizerBase | None = None, **overrides: Any) -> CLOCConfig:
    """A :class:`CLOCConfig` from a preset; ``tokenizer`` sets the text tower's vocabulary and special ids."""
    if name not in PRESETS:
        raise ValueError(f"unknown CLOC preset {name!r}; choose one of {sorted(PRESETS)}")
    values = copy.deepcopy(PRESETS[name])
    if tokenizer is not None:
        values["text_config"].update(text_config_token_ids(tokenizer))
    for key in ("vision_config", "text_config"):
        values[key].update(overrides.pop(key, {}) or {})
    values.update(overrides)
    return CLOCConfig(**values)


def build_cloc_model(name: str, tokenizer: PreTrainedTokenizerBase | None = None, **overrides: Any) -> CLOCModel:
    """A randomly initialised :class:`CLOCModel` from a preset."""
    return CLOCModel(preset_config(name, tokenizer, **overrides))


CLOC_ONLY_PREFIXES = ("prompter.", "box_head.", "region_logit_scale", "logit_bias")


def load_from_clip(path: str | os.PathLike[str], **cloc_overrides: Any) -> CLOCModel:
    """Load a local CLIP (``model_type="clip"``) or SigLIP (``"siglip"``) checkpoint folder into a CLOC encoder.

    The towers, projections and temperature come from the checkpoint; the prompter and box head are newly
    initialised. ``cloc_overrides`` set CLOC fields (e.g. ``prompter_pool="all"``). Raises when the checkpoint has
    weights the CLOC encoder does not take, or lacks tower weights.
    """
    source = AutoConfig.from_pretrained(path)
    if source.model_type not in ("clip", "siglip"):
        raise ValueError(f"{path}: config model_type={source.model_type!r}; expected a 'clip' or 'siglip' checkpoint")
    values: dict[str, Any] = {
        "vision_config": source.vision_config.to_dict(),
        "text_config": source.text_config.to_dict(),
        "logit_scale_init_value": getattr(source, "logit_scale_init_value", 2.6592),
    }
    if source.model_type == "clip":
        values["projection_dim"] = source.projection_dim
    else:
        values["contrastive_loss"] = "sigmoid"
    values.update(cloc_overrides)
    config = CLOCConfig(**values)
    model, info = CLOCModel.from_pretrained(path, config=config, output_loading_info=True)
    unexpected = list(info.get("unexpected_keys", []))
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(CLOC_ONLY_PREFIXES)]
    if config.backbone == "clip":
        unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if unexpected or missing:
        raise ValueError(
            f"{path}: checkpoint does not match the CLOC towers (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model
