"""Configuration of CLOC pretraining: one flat dataclass, loaded from YAML plus ``key=value`` overrides.

Command-line overrides use the field names; a dotted key descends into a mapping field, e.g.
``lr=5e-4 model_overrides.prompter_pool=all model_overrides.vision_config.image_size=32``. Values are converted to
the field's type (``1e-3`` is a float even though YAML 1.1 reads it as a string); an unknown key raises a
:class:`ConfigError` naming it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """An invalid training configuration; the message names the key at fault."""


@dataclass
class CLOCTrainConfig:
    """Everything a CLOC pretraining run needs. ``batch_size`` is per process and per micro-batch.

    The global batch of one optimizer step is ``batch_size · world_size · gradient_accumulation_steps``; the
    contrastive losses see ``batch_size · world_size`` images (they gather across ranks, not across micro-batches).
    """

    # data
    train_data: str = ""
    """A region-text JSONL file or a folder of JSONL shards (``docs/data_format.md``)."""
    val_data: str | None = None
    max_regions_per_image: int = 4
    """M: regions sampled per image per step (paper: 4); also written into the model config (grounding loss)."""
    resize_mode: Literal["pad", "squash", "crop"] = "pad"
    num_workers: int = 0

    # model
    preset: str = "tiny"
    """A name in ``cloc_encoder.factory.PRESETS``; ignored when ``init_from`` is set."""
    init_from: str | None = None
    """A local CLIP/SigLIP checkpoint folder (towers loaded, prompter new) or a CLOC folder (everything loaded)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """CLOCConfig fields, e.g. ``{"prompter_pool": "all", "vision_config": {"image_size": 32}}``."""

    # tokenizer
    tokenizer: str | None = None
    """A local tokenizer folder. Absent: the one in ``init_from``, else a BPE trained on the training texts."""
    tokenizer_vocab_size: int = 512
    max_text_length: int | None = None
    """Fixed token length of every caption (default: the text tower's ``max_position_embeddings``)."""

    # optimisation
    batch_size: int = 64
    gradient_accumulation_steps: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    max_steps: int = 1000
    max_minutes: float | None = None
    """Stop after this much wall time (checkpointing at the end) even if ``max_steps`` is not reached."""
    grad_clip: float | None = 1.0
    logit_scale_max: float | None = 4.6052
    """Clamp both logit scales to ``[0, this]`` after each step (CLIP: ln 100); not applied under DeepSpeed."""
    seed: int = 0

    # logging and checkpoints
    output_dir: str = "runs/cloc"
    log_every: int = 10
    eval_every: int = 0
    """Validation loss every N steps (0: only at the end when ``val_data`` is set)."""
    val_max_batches: int | None = None
    save_every: int = 500
    keep_last: int = 3
    resume: bool = False
    """Resume from ``output_dir``'s latest checkpoint when there is one."""
    resume_from: str | None = None
    """Resume from this checkpoint folder (a ``step-NNNNNN`` directory)."""
    tensorboard: bool = True
    progress_bar: bool = True

    # runtime
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    deepspeed: str | None = None
    """A DeepSpeed JSON config (e.g. ``train/deepspeed/zero2.json``); batch, accumulation, clipping and bf16 are
    filled in from this config at run time."""

    def validate(self) -> CLOCTrainConfig:
        """Check values that types alone do not; returns ``self``."""
        if not self.train_data:
            raise ConfigError("config key 'train_data' is required (a region-text JSONL file or folder)")
        positive = ("batch_size", "gradient_accumulation_steps", "max_steps", "log_every", "keep_last")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "eval_every", "save_every", "num_workers", "max_regions_per_image"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key {key!r} must be >= 0, got {getattr(self, key)}")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"config keys 'lr' (> 0) / 'min_lr_ratio' (0..1) invalid: {self.lr}, {self.min_lr_ratio}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"config key 'max_minutes' must be > 0, got {self.max_minutes}")
        if self.max_text_length is not None and self.max_text_length < 2:
            raise ConfigError(f"config key 'max_text_length' must be >= 2, got {self.max_text_length}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready values (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    def save_yaml(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(CLOCTrainConfig)}
_HINTS = typing.get_type_hints(CLOCTrainConfig)


def _fields_and_hints(config_class: type) -> tuple[dict[str, dataclasses.Field], dict[str, Any]]:
    """Field table and resolved type hints of a flat config dataclass (any of the project's train configs)."""
    if config_class is CLOCTrainConfig:
        return FIELDS, _HINTS
    return {f.name: f for f in dataclasses.fields(config_class)}, typing.get_type_hints(config_class)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _unknown_key(key: str, known: Iterable[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}unknown config key {key!r}{hint}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to the type ``hint``; raise naming ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~", ""))
        if is_null and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    try:
        if origin is Literal:
            if value not in args:
                raise ValueError(f"expected one of {list(args)}")
            return value
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in _TRUE | _FALSE:
                return text in _TRUE
            raise ValueError("expected true or false")
        if hint is int:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, bool) or not float(number).is_integer():
                raise ValueError("expected an integer")
            return int(number)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise ValueError("expected a string")
            return str(value)
        if origin is tuple:
            items = yaml.safe_load(value) if isinstance(value, str) and value.startswith("[") else value
            if isinstance(items, str):
                items = items.split(",")
            if not isinstance(items, (list, tuple)) or len(items) != len(args):
                raise ValueError(f"expected {len(args)} values")
            return tuple(_coerce(v, a, key) for v, a in zip(items, args, strict=True))
        if origin is dict:
            if not isinstance(value, Mapping):
                raise ValueError("expected a mapping")
            return {str(k): v for k, v in value.items()}
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config key {key!r}: cannot use {value!r} ({error})") from error
    raise ConfigError(f"config key {key!r}: unsupported field type {hint}")


def parse_scalar(text: str) -> Any:
    """A command-line value for a free-form mapping entry: YAML scalar, with ``1e-3``-style numbers as floats."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(
    values: dict[str, Any], overrides: Iterable[str], config_class: type = CLOCTrainConfig
) -> dict[str, Any]:
    """Apply ``key=value`` strings to a plain dict of values of ``config_class`` (returns a new dict)."""
    fields, hints = _fields_and_hints(config_class)
    values = copy.deepcopy(values)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        head, *path = key.split(".")
        if head not in fields:
            raise _unknown_key(head, fields, "")
        if not path:
            values[head] = yaml.safe_load(raw) if typing.get_origin(hints[head]) is dict else raw
            continue
        if typing.get_origin(hints[head]) is not dict:
            raise ConfigError(f"config key {key!r}: {head!r} is not a mapping, so it takes no dotted sub-keys")
        target = values.setdefault(head, {}) or {}
        values[head] = target
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"config key {key!r}: {part!r} is not a mapping")
        target[path[-1]] = parse_scalar(raw)
    return values


def config_from_dict(values: Mapping[str, Any], where: str = "", config_class: type = CLOCTrainConfig) -> Any:
    """Build a ``config_class`` from plain values, converting types; unknown keys raise :class:`ConfigError`."""
    fields, hints = _fields_and_hints(config_class)
    for key in values:
        if key not in fields:
            raise _unknown_key(str(key), fields, where)
    converted = {key: _coerce(value, hints[key], key) for key, value in values.items()}
    return config_class(**converted)


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_yaml(path: Path, fields: Mapping[str, Any], seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config's values, on top of its ``base`` (a YAML file relative to it) when it names one."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' loops back to itself ({' -> '.join(str(p) for p in (*seen, path))})")
    if not path.is_file():
        raise ConfigError(f"{seen[-1] if seen else path}: config file {path} not found")
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    base = loaded.pop(BASE_KEY, None)
    for key in loaded:
        if key not in fields:
            raise _unknown_key(str(key), fields, f"{path}: ")
    if base is None:
        return loaded
    return _deep_merge(_read_yaml(path.parent / str(base), fields, (*seen, path)), loaded)


BASE_KEY = "base"
"""A YAML config may start from another: ``base: mllm_stage2.yaml`` (relative to it); its keys override the base's,
mappings (``model_overrides``) merged key by key."""


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = (), config_class: type = CLOCTrainConfig
) -> Any:
    """Read a YAML config (optional; it may name a ``base`` config) and apply ``key=value`` overrides. Does not call
    ``validate``.

    ``config_class`` is the flat dataclass to build (default :class:`CLOCTrainConfig`; the MLLM trainer passes
    :class:`train.mllm_config.MLLMTrainConfig`)."""
    fields, _ = _fields_and_hints(config_class)
    values: dict[str, Any] = {}
    where = ""
    if path is not None:
        where = f"{path}: "
        values = _read_yaml(Path(path), fields)
    values = apply_overrides(values, overrides, config_class)
    return config_from_dict(values, where, config_class)


__all__ = [
    "BASE_KEY",
    "CLOCTrainConfig",
    "ConfigError",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "parse_scalar",
]
