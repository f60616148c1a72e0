"""A chat engine on a tiny random CLOC-LLaVA whose answers can be scripted (for the demo tests).

A random tiny model never writes a box; :class:`ScriptedLlava` forces a known answer through the real generation
loop (processor, prompt, vision tower, KV cache, streamer, stopping criteria) with one extra logits processor.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
from mllm.tiny import tiny_config
from serve.engine import ChatEngine


class _ForceTokens(LogitsProcessor):
    """Makes step ``k`` of generation emit ``script[k]`` (then EOS), optionally slowly (to watch streaming)."""

    def __init__(self, script: list[int], prompt_length: int, eos_token_id: int, delay: float) -> None:
        self.script, self.prompt_length, self.eos, self.delay = script, prompt_length, eos_token_id, delay

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        token = self.script[step] if step < len(self.script) else self.eos
        forced = torch.full_like(scores, float("-inf"))
        forced[:, token] = 0.0
        if self.delay:
            time.sleep(self.delay)
        return forced


class ScriptedLlava(CLOCLlavaForConditionalGeneration):
    """A CLOC-LLaVA whose ``generate`` answers ``self.script`` (token ids) when it is set, else as the model."""

    script: list[int] | None = None
    delay: float = 0.0

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if self.script is None:
            return super().generate(*args, **kwargs)
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        eos = self.config.text_config.eos_token_id
        processors.append(_ForceTokens(self.script, kwargs["input_ids"].shape[1], eos, self.delay))
        return super().generate(*args, logits_processor=processors, **kwargs)


def scripted_engine(tokenizer: Any, answer: str | None = None, delay: float = 0.0) -> ChatEngine:
    """A :class:`~serve.engine.ChatEngine` on a tiny random model that answers ``answer`` (``None``: the random
    model's own answer), sleeping ``delay`` seconds per token."""
    torch.manual_seed(0)
    config = tiny_config(tokenizer, text_config={"initializer_range": 0.2})
    model = ScriptedLlava._from_config(config).eval()
    set_script(model, tokenizer, answer, delay)
    return ChatEngine(
        model,
        CLOCLlavaProcessor.from_model_config(config, tokenizer),
        name="tiny random model with a scripted answer (test)",
    )


def set_script(model: ScriptedLlava, tokenizer: Any, answer: str | None, delay: float = 0.0) -> None:
    """Make ``model`` answer ``answer`` from now on (``None``: its own answers)."""
    model.script = None if answer is None else tokenizer.encode(answer, add_special_tokens=False)
    model.delay = delay
