"""Bridges between transformers versions (5.17 and later) for the configs and models of this project.

transformers 5.2x replaced composite configs' ``sub_configs`` class attribute by ``sub_configs_defaults``
(:class:`SubConfigSpec`, built in ``PreTrainedConfig.__post_init__``) and renamed the models' ``past_key_values``
argument and output field to ``cache``. Code here picks the spelling of the installed version; nothing is patched.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPast

try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers < 5.2x: composite configs declare `sub_configs` and build them themselves
    SubConfigSpec = None

HAS_SUB_CONFIG_SPECS = SubConfigSpec is not None
"""Whether ``PreTrainedConfig.__post_init__`` builds sub-configs from ``sub_configs_defaults``."""

CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
"""Name of the key-value cache in model outputs and in language models' ``forward`` (``past_key_values`` before
transformers 5.2x)."""


def sub_config_specs(specs: dict[str, tuple[type, str | None]]) -> dict[str, Any]:
    """``sub_configs_defaults`` (``SubConfigSpec`` per key) for new transformers, ``sub_configs`` for old ones.

    ``specs`` maps a field to ``(config class, default model_type)``; the model type is for ``AutoConfig``.
    """
    if HAS_SUB_CONFIG_SPECS:
        return {key: SubConfigSpec(config_class=cls, model_type=model_type) for key, (cls, model_type) in specs.items()}
    return {key: cls for key, (cls, _) in specs.items()}


def build_sub_configs(config: PreTrainedConfig, specs: dict[str, tuple[type, str | None]]) -> None:
    """On transformers without ``SubConfigSpec``: turn dict (or ``None``) sub-configs into config objects, as newer
    versions do in ``PreTrainedConfig.__post_init__``. A no-op on newer versions."""
    if HAS_SUB_CONFIG_SPECS:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for key, (cls, default_type) in specs.items():
        value = getattr(config, key)
        if isinstance(value, PreTrainedConfig):
            continue
        values = dict(value or {})
        model_type = values.pop("model_type", None) or default_type
        config_class = CONFIG_MAPPING[model_type] if cls is AutoConfig else cls
        setattr(config, key, config_class(**values))


def slice_logits_to_keep(hidden_states: Any, logits_to_keep: Any) -> Any:
    """``hidden_states[:, -k:]`` for an int ``k`` (``0`` keeps all), or the given indices (transformers'
    ``slice_logits_to_keep``, absent before 5.2x)."""
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden_states[:, keep, :]


def enable_activation_checkpointing(model: Any, use_reentrant: bool = False) -> None:
    """Turn on activation (gradient) checkpointing of a ``PreTrainedModel``: ``activation_checkpointing_enable``
    (transformers 5.2x) or ``gradient_checkpointing_enable`` (its older name, a deprecated alias since)."""
    options = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


__all__ = [
    "CACHE_FIELD",
    "HAS_SUB_CONFIG_SPECS",
    "build_sub_configs",
    "enable_activation_checkpointing",
    "slice_logits_to_keep",
    "sub_config_specs",
]
