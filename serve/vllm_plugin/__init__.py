"""vLLM plugin for CLOC-LLaVA: ``vllm serve <a CLOC-LLaVA folder>`` (docs/serving.md, "vLLM").

vLLM loads this through the entry point group ``vllm.general_plugins`` (``pyproject.toml``) and calls
:func:`register` in every process it starts. Importing this package imports nothing heavy (no vLLM, no torch), so
it is safe where vLLM is absent; the model (:mod:`serve.vllm_plugin.model`) and its multimodal processor
(:mod:`serve.vllm_plugin.processing`) import vLLM and are loaded by vLLM only when a CLOC-LLaVA model is served.
The region-reference rules shared with :mod:`serve.api` live in :mod:`serve.vllm_plugin.regions` (no vLLM).
"""

from __future__ import annotations

ARCHITECTURE = "CLOCLlavaForConditionalGeneration"
"""The ``architectures`` entry of a CLOC-LLaVA ``config.json`` (what ``save_pretrained`` writes)."""

MODEL_CLASS = "serve.vllm_plugin.model:CLOCLlavaForConditionalGenerationVLLM"
"""Where vLLM finds the model class (imported lazily, only when such a model is served)."""


TOKENIZER_MODE = "cloc_llava"
"""``--tokenizer-mode cloc_llava``: the HF tokenizer with :class:`serve.vllm_plugin.renderer.CLOCLlavaRenderer`,
which refuses regions sent without an image (vLLM's own renderer would answer them as text)."""


def register() -> None:
    """Register CLOC-LLaVA with vLLM: its config with transformers' ``AutoConfig`` (vLLM reads ``config.json``
    through it), the architecture with ``vllm.ModelRegistry``, and the tokenizer mode :data:`TOKENIZER_MODE` with
    vLLM's tokenizer and renderer registries. Idempotent; vLLM calls it in each process."""
    from vllm import ModelRegistry
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry

    import mllm  # noqa: F401  (registers model_type "cloc_llava" with AutoConfig / AutoProcessor)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    if TOKENIZER_MODE not in TokenizerRegistry.tokenizers:
        TokenizerRegistry.register(TOKENIZER_MODE, "vllm.tokenizers.hf", "CachedHfTokenizer")
    if TOKENIZER_MODE not in RENDERER_REGISTRY.renderers:
        RENDERER_REGISTRY.register(TOKENIZER_MODE, "serve.vllm_plugin.renderer", "CLOCLlavaRenderer")


__all__ = ["ARCHITECTURE", "MODEL_CLASS", "TOKENIZER_MODE", "register"]
