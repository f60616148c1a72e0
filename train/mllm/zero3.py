"""ZeRO-3 at load time: the model is built and loaded partitioned, so no rank ever holds the full model.

Under a ZeRO-3 DeepSpeed config the MLLM trainer builds its model inside :func:`sharded_build`: an active
``HfDeepSpeedConfig`` makes transformers' ``from_pretrained`` / ``_from_config`` construct every module under
``deepspeed.zero.Init`` (each parameter is partitioned as soon as its module exists; rank 0 reads checkpoint values
and scatters them); modules of our own are built under :func:`zero_init`; weights copied into an existing model
(the stage-1 projector) go through :func:`gathered`. A partitioned parameter's ``.data`` is an empty tensor: its
shape and size are :func:`full_shape` / :func:`full_numel`, this rank's slice is ``ds_tensor``.

Everything here is a no-op without ZeRO-3, and fails with a message naming DeepSpeed when it is needed but absent.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn


def deepspeed_available() -> bool:
    """Whether the ``deepspeed`` package is importable."""
    return importlib.util.find_spec("deepspeed") is not None


def require_deepspeed(what: str) -> None:
    """Raise a clear :class:`ImportError` when DeepSpeed is needed for ``what`` but not installed."""
    if not deepspeed_available():
        raise ImportError(f"{what} needs the deepspeed package, which is not installed (pip install deepspeed)")


def is_zero3(ds_config: dict[str, Any] | None) -> bool:
    """Whether a (filled) DeepSpeed config dict asks for ZeRO stage 3."""
    return bool(ds_config) and int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


def is_partitioned(parameter: torch.Tensor) -> bool:
    """Whether ``parameter`` is a ZeRO-3 parameter (built under ``zero.Init`` or converted by the engine)."""
    return hasattr(parameter, "ds_id")


def full_shape(parameter: torch.Tensor) -> torch.Size:
    """The parameter's real shape (``ds_shape`` for a partitioned one, whose ``.data`` is empty)."""
    return parameter.ds_shape if is_partitioned(parameter) else parameter.shape


def full_numel(parameter: torch.Tensor) -> int:
    """The parameter's real number of elements (``ds_numel`` for a partitioned one)."""
    return int(parameter.ds_numel) if is_partitioned(parameter) else parameter.numel()


def local_numel(parameter: torch.Tensor) -> int:
    """Elements this rank stores: its ZeRO-3 partition (``ds_tensor``, padded), else the whole tensor."""
    return int(parameter.ds_tensor.numel()) if is_partitioned(parameter) else parameter.numel()


def partition_report(model: nn.Module) -> dict[str, int]:
    """``{"local": elements stored on this rank, "full": elements of the full model, "partitioned": number of
    ZeRO-3 parameters, "parameters": number of parameters}`` (tied parameters counted once)."""
    unique = {id(p): p for p in model.parameters()}.values()
    return {
        "local": sum(local_numel(p) for p in unique),
        "full": sum(full_numel(p) for p in unique),
        "partitioned": sum(is_partitioned(p) for p in unique),
        "parameters": len(unique),
    }


@contextlib.contextmanager
def sharded_build(ds_config: dict[str, Any] | None) -> Iterator[bool]:
    """Activate transformers' DeepSpeed integration for a ZeRO-3 ``ds_config`` while building a model; yields
    whether it did (``False``, doing nothing, for any other config or ``None``).

    ``ds_config`` must be the filled dict the engine will get (no ``"auto"`` values): ``zero.Init`` takes the
    parameter dtype from its ``bf16`` section. The integration is switched off again on exit, so later models in
    the process (evaluation, a second run) load normally.
    """
    if not is_zero3(ds_config):
        yield False
        return
    require_deepspeed("ZeRO-3 (a deepspeed config with zero_optimization.stage=3)")
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    handle = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference: hold it while building
    try:
        yield True
    finally:
        del handle
        unset_hf_deepspeed_config()


def zero_init(ds_config: dict[str, Any] | None) -> contextlib.AbstractContextManager[Any]:
    """``deepspeed.zero.Init`` for modules of our own built from configs under ZeRO-3 (each module's parameters
    are created, initialised by its constructor and partitioned at once), else a no-op context."""
    if not is_zero3(ds_config):
        return contextlib.nullcontext()
    require_deepspeed("ZeRO-3")
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config)


def gathered(parameters: Iterable[torch.Tensor], modifier_rank: int | None = 0) -> contextlib.AbstractContextManager:
    """Gather the full values of the partitioned ones of ``parameters`` on every rank for the block (collective:
    every rank must enter it). With ``modifier_rank=r`` what rank ``r`` writes is re-partitioned on exit; with
    ``None`` writes are discarded. A no-op for ordinary parameters."""
    partitioned = [p for p in parameters if is_partitioned(p)]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


def partition_remaining(model: nn.Module, ds_config: dict[str, Any] | None) -> int:
    """Partition the parameters of ``model`` that are still whole under ZeRO-3 (e.g. the embedding and LM head
    transformers re-creates when resizing the vocabulary) now, so their memory goes before training starts;
    returns how many there were (always 0 without ZeRO-3)."""
    if not is_zero3(ds_config):
        return 0
    whole = {id(p) for p in model.parameters() if not is_partitioned(p)}
    if whole:
        require_deepspeed("ZeRO-3")
        import deepspeed

        deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)  # converts the module's whole parameters
    return len(whole)


def gathered_state_dict(model: nn.Module, keep: bool) -> dict[str, torch.Tensor] | None:
    """The full state dict of a (possibly partitioned) model as CPU tensors where ``keep`` (rank 0), ``None``
    elsewhere. Collective under ZeRO-3: every rank must call it; one module's parameters are gathered at a time,
    so only the keeping rank ever holds the whole model (in CPU memory)."""
    state: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        dotted = f"{prefix}." if prefix else ""
        parameters = list(module.named_parameters(recurse=False))
        with gathered([p for _, p in parameters], modifier_rank=None):
            if keep:
                for name, parameter in parameters:
                    state[dotted + name] = parameter.detach().to("cpu", copy=True)
        if keep:
            for name, buffer in module.named_buffers(recurse=False):
                if name not in module._non_persistent_buffers_set:
                    state[dotted + name] = buffer.detach().to("cpu", copy=True)
    return state if keep else None


__all__ = [
    "deepspeed_available",
    "full_numel",
    "full_shape",
    "gathered",
    "gathered_state_dict",
    "is_partitioned",
    "is_zero3",
    "local_numel",
    "partition_remaining",
    "partition_report",
    "require_deepspeed",
    "sharded_build",
    "zero_init",
]
