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

VICUNA_V1_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ render(messages[0]['content']) }}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{{ '" + VICUNA_SYSTEM_PROMPT.replace("'", "\\'") + "' }}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{ ' ' }}"
    "{%- for message in loop_messages -%}"
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

__all__ = ["VICUNA_SYSTEM_PROMPT", "VICUNA_V1_CHAT_TEMPLATE"]
