"""Loading a CLOC-LLaVA checkpoint with an attention implementation, optional 4/8-bit quantisation and a device map.

GPU-only features are detected, never assumed: each request that cannot be met fails with a message naming the
missing piece. The availability checks are small module-level functions so tests can replace them.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from transformers import BitsAndBytesConfig

from mllm.configuration_cloc_llava import CLOCLlavaConfig
from mllm.modeling_cloc_llava import CLOCLlavaForConditionalGeneration

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
QUANTIZATION_SKIP_MODULES = (".*vision_tower", ".*multi_modal_projector", ".*region_projector", ".*lm_head")
"""Modules kept in full precision under bitsandbytes. transformers 5.24 matches these from the start of a module's
path (or as a suffix of it), so a bare ``"vision_tower"`` would NOT skip ``model.vision_tower.…``: use regexes.
``lm_head`` is listed because a user-given skip list replaces transformers' default skips."""


def flash_attn_available() -> bool:
    """Whether the ``flash_attn`` package is importable."""
    return importlib.util.find_spec("flash_attn") is not None


def bitsandbytes_available() -> bool:
    """Whether the ``bitsandbytes`` package is importable."""
    return importlib.util.find_spec("bitsandbytes") is not None


def cuda_available() -> bool:
    """Whether a CUDA GPU is visible to torch."""
    return torch.cuda.is_available()


def resolve_attn_implementation(requested: str | None = "sdpa") -> str:
    """The attention implementation to load with.

    ``"sdpa"`` (default) and ``"eager"`` always work; ``"flash_attention_2"`` needs the ``flash_attn`` package and a
    CUDA GPU; ``"auto"`` (or ``None``) picks ``flash_attention_2`` when both are present, else ``"sdpa"``.
    """
    if requested in (None, "auto"):
        return "flash_attention_2" if flash_attn_available() and cuda_available() else "sdpa"
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={requested!r}; expected one of {(*ATTN_IMPLEMENTATIONS, 'auto')}")
    if requested == "flash_attention_2":
        if not flash_attn_available():
            raise ImportError(
                "attn_implementation='flash_attention_2' needs the flash_attn package, which is not installed "
                "(pip install 'cloc-mllm[gpu]' on a CUDA machine); use 'sdpa' instead"
            )
        if not cuda_available():
            raise RuntimeError(
                "attn_implementation='flash_attention_2' needs a CUDA GPU and none is visible; use 'sdpa'"
            )
    return requested


def quantization_config_for(
    bits: int | None,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip_modules: tuple[str, ...] = QUANTIZATION_SKIP_MODULES,
    allow_cpu: bool = False,
) -> BitsAndBytesConfig | None:
    """A ``BitsAndBytesConfig`` for the language model: 4-bit NF4 with double quantisation and ``compute_dtype``
    compute, or 8-bit (LLM.int8). The vision tower, projectors and LM head stay unquantised. ``None`` → no
    quantisation.

    bitsandbytes also runs on CPU (slowly); pass ``allow_cpu=True`` to allow that, otherwise a GPU is required.
    """
    if bits is None:
        return None
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r}; bitsandbytes quantisation supports 4 or 8")
    if not bitsandbytes_available():
        raise ImportError(
            f"bits={bits} needs the bitsandbytes package, which is not installed "
            "(pip install 'cloc-mllm[quantization]')"
        )
    if not (allow_cpu or cuda_available()):
        raise RuntimeError(f"bits={bits} quantisation needs a CUDA GPU and none is visible (or pass allow_cpu=True)")
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=list(skip_modules),
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))


def loading_options(
    bits: int | None = None,
    attn_implementation: str | None = "sdpa",
    device_map: str | dict[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    allow_cpu_quantization: bool = False,
) -> dict[str, Any]:
    """The ``from_pretrained`` keyword arguments :func:`load_pretrained_model` uses (checks included).

    ``dtype`` defaults to bfloat16 with quantisation or flash attention; quantised models default to
    ``device_map={"": 0}`` (the first GPU), or ``{"": "cpu"}`` with ``allow_cpu_quantization`` and no GPU.
    """
    attn = resolve_attn_implementation(attn_implementation)
    quantization = quantization_config_for(bits, allow_cpu=allow_cpu_quantization)
    if dtype is None and (quantization is not None or attn == "flash_attention_2"):
        dtype = torch.bfloat16
    if quantization is not None and device_map is None:
        device_map = {"": 0} if cuda_available() else {"": "cpu"}
    options: dict[str, Any] = {"attn_implementation": attn}
    if dtype is not None:
        options["dtype"] = dtype
    if device_map is not None:
        options["device_map"] = device_map
    if quantization is not None:
        options["quantization_config"] = quantization
    return options


def load_pretrained_model(
    path: str | os.PathLike[str],
    bits: int | None = None,
    attn_implementation: str | None = "sdpa",
    device_map: str | dict[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    allow_cpu_quantization: bool = False,
    **kwargs: Any,
) -> CLOCLlavaForConditionalGeneration:
    """Load a saved CLOC-LLaVA checkpoint folder (``import mllm`` is all the Auto classes need; this adds checks).

    Args:
        path: a folder written by ``save_pretrained`` (a hub id works only with network access).
        bits: ``4``/``8`` for bitsandbytes quantisation of the language model, ``None`` for none.
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"`` or ``"auto"``
            (:func:`resolve_attn_implementation`).
        device_map: passed to ``from_pretrained`` (``"auto"`` needs accelerate).
        dtype: weight dtype (see :func:`loading_options` for the defaults).
        kwargs: more ``from_pretrained`` arguments.
    """
    config = CLOCLlavaConfig.from_pretrained(path)
    options = loading_options(bits, attn_implementation, device_map, dtype, allow_cpu_quantization)
    return CLOCLlavaForConditionalGeneration.from_pretrained(path, config=config, **options, **kwargs)


__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "QUANTIZATION_SKIP_MODULES",
    "load_pretrained_model",
    "loading_options",
    "quantization_config_for",
    "resolve_attn_implementation",
]
