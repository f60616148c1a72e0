"""Front ends for a CLOC-LLaVA model: the shared chat engine (:mod:`serve.engine`), the terminal chat
(:mod:`serve.cli`), the OpenAI-compatible HTTP API (:mod:`serve.api`) and the Gradio demo (:mod:`serve.demo`).

This module holds the constants and the error type every front end shares.
"""

from __future__ import annotations

from mllm.defaults import DEFAULT_CHECKPOINT as DEFAULT_MODEL

MAX_IMAGE_PIXELS = 16_000_000
"""Default bound on an image's width × height (larger images are refused with :class:`InputError`)."""

MAX_IMAGE_BYTES = 32 * 1024 * 1024
"""Default bound on the size of an encoded image file."""


class InputError(ValueError):
    """Bad user input (an image, a region, a message, a setting). The message is safe to show to the user."""


class ModelLoadError(ValueError):
    """A model folder that exists but cannot be served; the message names the file and what is wrong."""


def one_line(error: BaseException | str, limit: int = 400) -> str:
    """``error``'s message on one line (whitespace runs collapsed), at most ``limit`` characters: what the command
    lines print after ``error:``."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["DEFAULT_MODEL", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "InputError", "ModelLoadError", "one_line"]
