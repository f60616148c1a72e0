"""Train configs (CLOC pretraining, the MLLM stages): flat dataclasses loaded from YAML plus ``key=value`` overrides.

Command-line overrides use the field names; a dotted key descends into a mapping field, e.g.
``lr=5e-4 model_overrides.prompter_pool=all model_overrides.vision_config.image_size=32``. Values are converted to
the field's type (``1e-3`` is a float even though YAML 1.1 reads it as a string); an unknown key raises a
:class:`ConfigError` naming it. The config classes themselves live with their trainers
(:mod:`train.cloc.config`, :mod:`train.mllm.config`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """An invalid training configuration; the message names the key at fault."""


@functools.cache
def _fields_and_hints(config_class: type) -> tuple[dict[str, dataclasses.Field], dict[str, Any]]:
    """Field table and resolved type hints of a flat config dataclass (any of the project's train configs)."""
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


def apply_overrides(values: dict[str, Any], overrides: Iterable[str], config_class: type) -> dict[str, Any]:
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


def config_from_dict(values: Mapping[str, Any], config_class: type, where: str = "") -> Any:
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


def load_train_config(path: str | os.PathLike[str] | None, overrides: Iterable[str], config_class: type) -> Any:
    """Read a YAML config (optional; it may name a ``base`` config) and apply ``key=value`` overrides into a
    ``config_class`` (a flat dataclass: :class:`train.cloc.config.CLOCTrainConfig`,
    :class:`train.mllm.config.MLLMTrainConfig`). Does not call ``validate``."""
    fields, _ = _fields_and_hints(config_class)
    values: dict[str, Any] = {}
    where = ""
    if path is not None:
        where = f"{path}: "
        values = _read_yaml(Path(path), fields)
    values = apply_overrides(values, overrides, config_class)
    return config_from_dict(values, config_class, where)


__all__ = [
    "BASE_KEY",
    "ConfigError",
    "apply_overrides",
    "config_from_dict",
    "load_train_config",
    "parse_scalar",
]
