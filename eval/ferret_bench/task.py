"""Ferret-Bench (Ferret, You et al. 2023): region-referring and grounded conversation, judged by an LLM against
GPT-4's reference answers, as in apple/ml-ferret ``ferret/eval/`` (``model_gpt4eval_3newclass.py``,
``eval_gpt_review_3newclass.py``, ``summarize_gpt_review.py``).

Files (ml-ferret ``ferret/eval/ferret_gpt4_data/``): ``<task>/question.jsonl``, ``context.jsonl`` (the image's
objects with 0–1 boxes, relationships, region descriptions and captions, as GPT-4 saw it), ``answer.jsonl``
(GPT-4's answer) for ``refer_caption`` (category ``refer_desc``), ``refer_reason`` and ``ground_conv``, and the judge
instructions per category ``rule.json``. Images: COCO 2017 (val) by file name.

- **Question**: each 0–1 float box in the question (``[0.621, 0.082, 0.772, 0.132]``) becomes
  ``processor.format_region(box)`` (``[x1, y1, x2, y2] <region>`` in the model's codec, as Ferret writes its
  0–1000 integers + ``<region_fea>``) with the exact box for the prompter.
- **Answer for the judge** (Ferret's ``postprocess_answer``): refer tasks drop box text from the model's answer;
  ``ground_conv`` rewrites each box from the model's codec to 3-decimal 0–1 floats, the context's format.
- **Review prompt**: ``[Context]`` + ``[Question]`` (the original text) + ``[Assistant 1]`` (GPT-4's answer) +
  ``[Assistant 2]`` (the model's) + ``[System]`` (the category's rule), with Ferret's system message,
  temperature 0.2 and 1024 max tokens. (Ferret's f-string wrote ``[Context]\\`` without the newline; here it is a
  newline.)
- **Score** per task: mean model score / mean reference score × 100 over judged questions (failed reviews are
  left out and counted; Ferret counted them as ``-1, -1``); ``average`` is the mean of the three task scores (the
  paper's "Avg."), ``all_pooled`` the ratio over every review pooled (``summarize_gpt_review.py``'s ``all``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.mllm_generation import Question
from mllm import CLOCLlavaProcessor
from mllm.box_codec import BOX_PATTERN, BoxCodec

TASKS = {"refer_caption": "refer_desc", "refer_reason": "refer_reason", "ground_conv": "ground_conv"}
"""Task folder → the ``category`` its files and ``rule.json`` use."""
JUDGE_SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."


@dataclass(frozen=True)
class FerretItem:
    """One Ferret-Bench question with its context and GPT-4 reference answer."""

    task: str
    category: str
    question_id: int
    image: str
    question: str
    context: str
    reference: str

    @property
    def id(self) -> str:
        return f"{self.task}-{self.question_id}"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (expected ml-ferret's ferret_gpt4_data layout)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from error
    return rows


def load_ferret_bench(root: str | Path, tasks: Iterable[str] = TASKS, limit: int | None = None) -> list[FerretItem]:
    """The questions of ``tasks`` (first ``limit`` of each), joined with context and reference by ``question_id``."""
    root = Path(root)
    items = []
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown Ferret-Bench task {task!r}; choose from {list(TASKS)}")
        questions = _read_jsonl(root / task / "question.jsonl")[:limit]
        contexts = {r["question_id"]: r for r in _read_jsonl(root / task / "context.jsonl")}
        answers = {r["question_id"]: r for r in _read_jsonl(root / task / "answer.jsonl")}
        for q in questions:
            qid = q["question_id"]
            if qid not in contexts or qid not in answers:
                raise ValueError(f"{root / task}: question {qid} has no context or reference answer")
            if not contexts[qid]["image"] == answers[qid]["image"] == q["image"]:
                raise ValueError(f"{root / task}: question {qid}: the three files disagree on the image")
            category = q.get("category", TASKS[task])
            items.append(
                FerretItem(task, category, qid, q["image"], q["text"], contexts[qid]["text"], answers[qid]["text"])
            )
    return items


def load_rules(root: str | Path) -> dict[str, dict[str, str]]:
    """``rule.json``: per category, the judge's ``role`` and instruction ``prompt``."""
    path = Path(root) / "rule.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the judge instructions of Ferret-Bench)")
    rules = json.loads(path.read_text(encoding="utf-8"))
    missing = [c for c in TASKS.values() if c not in rules]
    if missing:
        raise ValueError(f"{path}: no rule for {missing}")
    return rules


def ferret_question(item: FerretItem, images_dir: str | Path, processor: CLOCLlavaProcessor) -> Question:
    """The model's question: each 0–1 box of the text written ``processor.format_region(box)`` (``[x1, y1, x2, y2]
    <region>`` in the model's codec), its exact box in ``boxes`` (a box that is not a valid 0–1 box stays text)."""
    parts, boxes, last = [], [], 0
    for match in BOX_PATTERN.finditer(item.question):
        box = tuple(float(v) for v in match.groups())
        if not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            continue
        parts += [item.question[last : match.start()], processor.format_region(box)]
        boxes.append(box)
        last = match.end()
    parts.append(item.question[last:])
    return Question(item.id, Path(images_dir) / Path(item.image).name, "".join(parts), tuple(boxes))  # type: ignore[arg-type]


def answer_for_judge(answer: str, category: str, codec: BoxCodec) -> str:
    """Ferret's ``postprocess_answer``: refer tasks lose their box text; ``ground_conv`` boxes are rewritten from
    the model's codec to ``[0.123, 0.456, 0.789, 0.999]`` (unparseable ones are dropped)."""
    if category in ("refer_desc", "refer_reason"):
        return BOX_PATTERN.sub("", answer).replace("  ", " ").strip()

    def as_float(match: Any) -> str:
        box = codec.decode_match(match)
        return "" if box is None else "[" + ", ".join(f"{v:.3f}" for v in box) + "]"

    return BOX_PATTERN.sub(as_float, answer)


def review_messages(item: FerretItem, answer: str, rule: Mapping[str, str]) -> list[dict[str, str]]:
    """The chat messages of one review, laid out as Ferret's ``eval_gpt_review_3newclass.py``."""
    role, prompt = rule["role"], rule["prompt"]
    content = (
        f"[Context]\n{item.context}\n\n"
        f"[Question]\n{item.question}\n\n"
        f"[{role} 1]\n{item.reference}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
        f"[System]\n{prompt}\n\n"
    )
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": content}]


def ferret_scores(pairs: Mapping[str, Sequence[tuple[float, float]]]) -> dict[str, Any]:
    """Per task, from ``(reference score, model score)`` pairs: ``score`` = mean model / mean reference × 100
    (``None`` with no pair or a zero reference mean); ``average`` of the task scores; ``all_pooled`` over every
    pair."""
    metrics: dict[str, Any] = {}

    def summary(values: Sequence[tuple[float, float]]) -> dict[str, Any]:
        reference = sum(v[0] for v in values) / len(values) if values else 0.0
        model = sum(v[1] for v in values) / len(values) if values else 0.0
        score = 100 * model / reference if reference > 0 else None
        return {"score": score, "model_mean": model, "reference_mean": reference, "judged": len(values)}

    for task, values in pairs.items():
        metrics[task] = summary(values)
    scores = [m["score"] for m in metrics.values() if m["score"] is not None]
    metrics["average"] = sum(scores) / len(scores) if scores and len(scores) == len(pairs) else None
    metrics["all_pooled"] = summary([v for values in pairs.values() for v in values])["score"]
    return metrics


__all__ = [
    "JUDGE_SYSTEM_PROMPT",
    "TASKS",
    "FerretItem",
    "answer_for_judge",
    "ferret_question",
    "ferret_scores",
    "load_ferret_bench",
    "load_rules",
    "review_messages",
]
