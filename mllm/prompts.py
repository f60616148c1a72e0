"""The task prompts the model is trained and evaluated with: part of its I/O contract, like the chat template
(:mod:`mllm.chat_template`) and the box codec (:mod:`mllm.box_codec`).

Training conversations (:mod:`train.mllm.conversations`) and the benchmarks (:mod:`eval`) ask with the same words,
so a model is evaluated on the questions it learned:

- grounding: ``GROUNDING_QUESTION.format(expression=with_article("red circle"))`` → ``"Where is the red circle?"``;
  the answer is the box text;
- referring: ``REFERRING_QUESTION.format(region="[x1, y1, x2, y2] <region>")``; the answer is the region's caption;
- captioning: ``CAPTION_QUESTION``.
"""

from __future__ import annotations

GROUNDING_QUESTION = "Where is {expression}?"
REFERRING_QUESTION = "What is {region}?"
CAPTION_QUESTION = "Describe the image briefly."
_DETERMINERS = ("the", "a", "an", "this", "that", "these", "those", "his", "her", "its", "their", "my", "your", "our")


def with_article(expression: str) -> str:
    """``"red circle"`` → ``"the red circle"``; an expression that starts with a determiner is kept as it is."""
    text = expression.strip()
    first = text.split(" ", 1)[0].lower() if text else ""
    return text if first in _DETERMINERS else f"the {text}"


__all__ = ["CAPTION_QUESTION", "GROUNDING_QUESTION", "REFERRING_QUESTION", "with_article"]
