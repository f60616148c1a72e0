"""Front ends for a CLOC-LLaVA model: the shared chat engine (:mod:`serve.engine`), the terminal chat
(:mod:`serve.cli`), the OpenAI-compatible HTTP API (:mod:`serve.api`) and the Gradio demo (:mod:`serve.demo`).

This module stays light (no torch import): it holds the constants and the error type every front end shares.
"""

from __future__ import annotations

DEFAULT_MODEL = "runs/mllm_tiny_stage2"
"""The model every front end loads by default: the stage-2 run of ``bash scripts/quickstart.sh`` (a training run
folder; its latest checkpoint is used)."""

MAX_IMAGE_PIXELS = 16_000_000
"""Default bound on an image's width × height (larger images are refused with :class:`InputError`)."""

MAX_IMAGE_BYTES = 32 * 1024 * 1024
"""Default bound on the size of an encoded image file."""


class InputError(ValueError):
    """Bad user input (an image, a region, a message, a setting). The message is safe to show to the user."""


__all__ = ["DEFAULT_MODEL", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "InputError"]
