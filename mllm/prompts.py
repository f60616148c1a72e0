"""The task prompts the model is trained and evaluated with: part of its I/O contract, like the chat template
(:mod:`mllm.chat_template`) and the box codec (:mod:`mllm.box_codec`).

Training conversations (:mod:`train.mllm.conversations`) and the benchmarks (:mod:`eval`) ask with the same words,
so a model is evaluated on the questions it learned:

- grounding: ``GROUNDING_QUESTION.format(expression=with_article("red circle"))`` → ``"Where is the red circle?"``;
  the answer is the box text;
- referring: ``REFERRING_QUESTION.format(region="[x1, y1, x2, y2] <region>")``; the answer is the region's caption;
- captioning: ``CAPTION_QUESTION``.

Other projects ask the same questions in their own words, and a model is evaluated in those words by their harnesses
(lmms-eval's ``refcoco_bbox_rec``, Ferret's and LLaVA-1.5's RefCOCO scripts). :data:`WORDINGS` names each one; the
training conversations can mix them (``--wordings``) so that the model answers a box whichever way it is asked. A
wording whose prompt asks for 0–1 floats (LLaVA-1.5, lmms-eval) is answered, and writes its regions, with the
``"float"`` box codec; the others use the model's codec.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUNDING_QUESTION = "Where is {expression}?"
REFERRING_QUESTION = "What is {region}?"
CAPTION_QUESTION = "Describe the image briefly."
LMMS_EVAL_REC_PREAMBLE = (
    "Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, bottom-right y). "
    "All values are floating point numbers bounded between 0 and 1. "
)
"""lmms-eval's ``refcoco_bbox_rec`` preamble (``lmms_eval/tasks/refcoco/utils_rec.py``), word for word."""
_DETERMINERS = ("the", "a", "an", "this", "that", "these", "those", "his", "her", "its", "their", "my", "your", "our")


@dataclass(frozen=True)
class Wording:
    """One way of asking the grounding and referring questions.

    Attributes:
        name: registry key (``--wordings`` value).
        grounding: the grounding question, with ``{expression}``.
        referring: the referring question, with ``{region}`` (the region's box text and ``<region>``).
        box_codec: the codec of the box text in this wording's questions and answers; ``None``: the model's own.
        article: whether the expression gets ``"the"`` (:func:`with_article`) before it is put in the question.
    """

    name: str
    grounding: str
    referring: str
    box_codec: str | None = None
    article: bool = False

    def grounding_question(self, expression: str) -> str:
        """The grounding question for one referring expression."""
        text = with_article(expression) if self.article else expression.strip()
        return self.grounding.format(expression=text)

    def referring_question(self, region_text: str) -> str:
        """The referring question for one region, given as ``"[x1, y1, x2, y2] <region>"`` in this wording's codec."""
        return self.referring.format(region=region_text)


_LLAVA_REC = "Please provide the bounding box coordinate of the region this sentence describes: {expression}"
_LLAVA_REG = "Please provide a short description for this region: {region}"
WORDINGS: dict[str, Wording] = {
    "default": Wording("default", GROUNDING_QUESTION, REFERRING_QUESTION, article=True),
    # Ferret's RefCOCO script (ferret/eval/model_refcoco.py) and its LVIS region-classification question.
    "ferret": Wording(
        "ferret",
        "What is the location of {expression} in the image?",
        "What is the class of object {region} within the image?",
    ),
    # LLaVA-1.5's RefCOCO REC / REG instructions; its boxes are 0-1 floats.
    "llava": Wording("llava", _LLAVA_REC, _LLAVA_REG, box_codec="float"),
    # lmms-eval's refcoco_bbox_rec: LLaVA-1.5's instruction after a preamble that asks for floats.
    "lmms_eval": Wording("lmms_eval", LMMS_EVAL_REC_PREAMBLE + _LLAVA_REC, _LLAVA_REG, box_codec="float"),
}
"""Every wording the conversations converter and the evaluations know, by name."""
DEFAULT_WORDING = "default"


def get_wording(name: str) -> Wording:
    """The wording registered under ``name``; a clear ``ValueError`` for an unknown one."""
    if name not in WORDINGS:
        raise ValueError(f"unknown wording {name!r}; choose from {sorted(WORDINGS)}")
    return WORDINGS[name]


def with_article(expression: str) -> str:
    """``"red circle"`` → ``"the red circle"``; an expression that starts with a determiner is kept as it is."""
    text = expression.strip()
    first = text.split(" ", 1)[0].lower() if text else ""
    return text if first in _DETERMINERS else f"the {text}"


__all__ = [
    "CAPTION_QUESTION",
    "DEFAULT_WORDING",
    "GROUNDING_QUESTION",
    "LMMS_EVAL_REC_PREAMBLE",
    "REFERRING_QUESTION",
    "WORDINGS",
    "Wording",
    "get_wording",
    "with_article",
]
