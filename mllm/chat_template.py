"""The default chat template: Vicuna v1 (LLaVA-1.5's ``conv_vicuna_v1``), for base LLMs that ship none.

Rendered text, for a system prompt ``SYS`` and two rounds::

    SYS USER: <image>\\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>

``add_generation_prompt=True`` ends the text with ``ASSISTANT:``; the reply's leading space is part of the
assistant's turn, so the prompt the model sees at inference is exactly the prefix it was trained on. Each reply
and its end-of-sequence token sit inside ``{% generation %}`` so ``return_assistant_tokens_mask=True`` marks the
tokens that carry the loss in training. Message content is a string, or a list of parts ``{"type": "image"}``
(rendered ``<image>\\n``, as LLaVA places it) and ``{"type": "text", "text": ...}``. The BOS token is not in the
template: the tokenizer adds it when the text is tokenized.
"""

from __future__ import annotations

VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def _render_macro(image_after_text: bool) -> str:
    """The template's ``render(content)`` macro: a string as it is; a list of parts with each image part as
    ``<image>\\n`` before its text (LLaVA), or, with ``image_after_text``, the text first and then ``\\n<image>``."""
    text = "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    if image_after_text:
        parts = (
            "{%- for part in content -%}" + text + "{%- endfor -%}"
            "{%- for part in content -%}{%- if part['type'] == 'image' -%}{{ '\\n<image>' }}{%- endif -%}{%- endfor -%}"
        )
    else:
        parts = (
            "{%- for part in content -%}"
            "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
            "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )
    return (
        "{%- macro render(content) -%}"
        "{%- if content is string -%}{{ content }}"
        "{%- else -%}" + parts + "{%- endif -%}"
        "{%- endmacro -%}"
    )


def _vicuna_template(default_system_prompt: str | None, image_after_text: bool) -> str:
    """Vicuna v1 turns (``USER: ... ASSISTANT: ...</s>``); a first ``system`` message replaces the default system
    prompt (none when ``None``), followed by a space."""
    if default_system_prompt is None:
        system = (
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{{ render(messages[0]['content']) }}{{ ' ' }}{%- set loop_messages = messages[1:] -%}"
            "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
        )
    else:
        system = (
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{{ render(messages[0]['content']) }}{%- set loop_messages = messages[1:] -%}"
            "{%- else -%}"
            "{{ '" + default_system_prompt.replace("'", "\\'") + "' }}{%- set loop_messages = messages -%}"
            "{%- endif -%}"
            "{{ ' ' }}"
        )
    return (
        _render_macro(image_after_text) + system + "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ 'USER: ' }}{{ render(message['content']) }}{{ ' ' }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ 'ASSISTANT:' }}{% generation %}{{ ' ' }}{{ render(message['content']) }}{{ eos_token }}{% endgeneration %}"
        "{%- else -%}"
        "{{ raise_exception('Vicuna template: roles are system (first), user and assistant; got ' + message['role']) }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


VICUNA_V1_CHAT_TEMPLATE = _vicuna_template(VICUNA_SYSTEM_PROMPT, image_after_text=False)
"""LLaVA-1.5's ``conv_vicuna_v1``: the default for LLMs that ship no template."""
INSTRUCTION_FIRST_CHAT_TEMPLATE = _vicuna_template(None, image_after_text=True)
"""Vicuna v1 turns without a default system prompt, the image placed after the user's text
(``USER: Where is the red circle?\\n<image> ASSISTANT: [...]</s>``): the causal LLM reads the question before the
image tokens, so each image token can attend to the words that name what is asked. The synthetic-world recipe
uses it (``mllm_tiny_stage1.yaml``; docs/benchmarks.md, fourth and sixth rounds); a model keeps its template, so
evaluation and serving render prompts the way it was trained."""
CHAT_TEMPLATES: dict[str, str] = {
    "vicuna_v1": VICUNA_V1_CHAT_TEMPLATE,
    "instruction_first": INSTRUCTION_FIRST_CHAT_TEMPLATE,
}
"""Named chat templates (``chat_template`` of the MLLM training config)."""


__all__ = ["CHAT_TEMPLATES", "INSTRUCTION_FIRST_CHAT_TEMPLATE", "VICUNA_SYSTEM_PROMPT", "VICUNA_V1_CHAT_TEMPLATE"]
