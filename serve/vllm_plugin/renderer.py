"""vLLM renderer for CLOC-LLaVA: refuses region boxes sent without an image (``--tokenizer-mode cloc_llava``).

vLLM runs a model's multimodal processor (:mod:`serve.vllm_plugin.processing`, which checks regions) only for a
prompt with multimodal data, so a request whose ``mm_processor_kwargs`` carry ``regions`` but that has no image
would be answered as plain text. The renderer sees every prompt with its ``mm_processor_kwargs`` (chat and
completions, online and offline) just before it is handed to the engine; this one is vLLM's
:class:`~vllm.renderers.hf.HfRenderer` plus that check. It is selected the way vLLM selects its own renderers
(``cohere``, ``inkling``: the HF tokenizer with another renderer), through the tokenizer mode
``cloc_llava`` that :func:`serve.vllm_plugin.register` adds to vLLM's tokenizer and renderer registries.
"""

from __future__ import annotations

from typing import Any

from vllm.exceptions import VLLMValidationError
from vllm.renderers.hf import HfRenderer

from serve.vllm_plugin.processing import REGIONS_KWARG


def check_regions_have_an_image(prompt: Any) -> None:
    """Raise :class:`~vllm.exceptions.VLLMValidationError` (a 400 from vLLM's server) for a prompt whose
    ``mm_processor_kwargs`` carry ``regions`` while it has no image."""
    if not isinstance(prompt, dict):
        return
    kwargs = prompt.get("mm_processor_kwargs") or {}
    if isinstance(kwargs, dict) and kwargs.get(REGIONS_KWARG) and not (prompt.get("multi_modal_data") or {}):
        raise VLLMValidationError(
            "regions need an image: mm_processor_kwargs.regions was sent but the request has no image "
            "(send the image as an image_url part of a user message)",
            parameter="mm_processor_kwargs",
        )


class CLOCLlavaRenderer(HfRenderer):
    """:class:`~vllm.renderers.hf.HfRenderer` that refuses regions without an image (module docstring)."""

    def process_for_engine(self, prompt, arrival_time, **kwargs):  # type: ignore[no-untyped-def, override]
        check_regions_have_an_image(prompt)
        return super().process_for_engine(prompt, arrival_time, **kwargs)

    async def process_for_engine_async(self, prompt, arrival_time, **kwargs):  # type: ignore[no-untyped-def, override]
        check_regions_have_an_image(prompt)
        return await super().process_for_engine_async(prompt, arrival_time, **kwargs)
