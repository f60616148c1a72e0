"""Conversation data for MLLM training: LLaVA's JSON format with region boxes, and converters from region-text data.

One sample (a JSON list of these, or one per line in JSONL)::

    {"id": "syn-train-000000-referring-0",
     "image": "images/train/syn-train-000000.png",
     "conversations": [
         {"from": "human", "value": "<image>\\nWhat is [343, 749, 593, 999] <region>?"},
         {"from": "gpt", "value": "small yellow square"},
         {"from": "human", "value": "Where is the red square?"},
         {"from": "gpt", "value": "[250, 593, 500, 843]"}],
     "boxes": [[0.34375, 0.75, 0.59375, 1.0]]}

This is LLaVA's format (``from`` is ``human``/``gpt``, or ``user``/``assistant``; an optional first ``system`` turn
replaces the template's system prompt) plus two conventions of this project (``docs/mllm.md``):

- **Boxes as text** (prompts and answers) are written by the model's box codec in the **original** image frame:
  ``[x1, y1, x2, y2]`` on the 0–999 grid by default (``"int999"``), or 3-decimal floats (``"float"``).
- **Regions** in a human turn are written ``[x1, y1, x2, y2] <region>``; the ``<region>`` token is filled with the
  prompter's embedding of that box. ``boxes`` (optional) holds one exact normalised original-frame ``xyxy`` box per
  ``<region>`` of the conversation, in order; without it the box is read from the text before each ``<region>``.

``image`` is relative to an image folder (the trainer's ``image_folder``, else the data file's folder) or absolute.
``<image>`` may appear once, in a human turn (LLaVA writes ``"<image>\\n..."`` in the first one); a sample with an
image and no ``<image>`` gets it at the start of its first human turn. Other keys (``task``, ``width``, ...) are
kept and ignored.

Converters (:func:`conversations_from_records`, command line below) turn region-text records
(``docs/data_format.md``: the synthetic world, RefCOCO/COCO/VG conversions) into three tasks:

- ``grounding``: "Where is <expression>?" → the region's box text;
- ``referring``: "What is [x1, y1, x2, y2] <region>?" → the region's caption (else its first expression);
- ``caption``: "Describe the image briefly." → the image caption.

Command line::

    python -m train.mllm_conversations --data runs/world/train.jsonl --out runs/world/train_conv.json \\
        --tasks grounding,referring,caption [--codec int999] [--max-turns 1] [--mix-tasks] [--expression random] \\
        [--seed 0] [--wordings default,ferret,llava,lmms_eval | --wordings grounding=default,lmms_eval ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloc_encoder.boxes import BoxError, validate_box
from cloc_encoder.data.format import ReadReport, RecordError, RegionTextRecord, atomic_write_text, read_region_text
from mllm.box_codec import BOX_PATTERN, DEFAULT_BOX_CODEC, get_box_codec
from mllm.prompts import CAPTION_QUESTION, DEFAULT_WORDING, WORDINGS, get_wording
from mllm.tokenization import IMAGE_TOKEN, REGION_TOKEN

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
"""LLaVA's ``from`` values (and the chat-template role names) → chat-template roles."""

TASKS = ("grounding", "referring", "caption")
_REGION_WITH_BOX = re.compile(rf"(?:(?P<box>{BOX_PATTERN.pattern})\s*)?{re.escape(REGION_TOKEN)}")


# ----- the record ----------------------------------------------------------------------------------------------------


@dataclass
class ConversationRecord:
    """One training conversation. ``turns`` are ``(role, text)`` with roles ``system``/``user``/``assistant``.

    ``boxes`` (normalised original-frame ``xyxy``, one per ``<region>`` in order) is ``None`` when the boxes are
    read from the text. ``image`` is a path relative to ``root`` (or absolute), or ``None`` for a text-only sample.
    """

    id: str
    turns: list[tuple[str, str]]
    image: str | None = None
    boxes: list[list[float]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    root: Path | None = field(default=None, compare=False, repr=False)

    @property
    def image_path(self) -> Path | None:
        if self.image is None:
            return None
        path = Path(self.image)
        return path if path.is_absolute() or self.root is None else self.root / path

    @property
    def num_regions(self) -> int:
        return sum(text.count(REGION_TOKEN) for role, text in self.turns if role == "user")

    def messages(self) -> list[dict[str, Any]]:
        """Chat-template messages. The image becomes a ``{"type": "image"}`` part at the start of the user turn that
        held ``<image>`` (the first user turn when none did), as at inference; other content stays a string."""
        image_turn = None
        if self.image is not None:
            holders = [i for i, (role, text) in enumerate(self.turns) if role == "user" and IMAGE_TOKEN in text]
            image_turn = holders[0] if holders else next(i for i, (role, _) in enumerate(self.turns) if role == "user")
        messages = []
        for index, (role, text) in enumerate(self.turns):
            if index == image_turn:
                rest = text.replace(IMAGE_TOKEN, "").strip()
                messages.append({"role": role, "content": [{"type": "image"}, {"type": "text", "text": rest}]})
            else:
                messages.append({"role": role, "content": text})
        return messages

    def estimated_length(self, image_tokens: int) -> int:
        """A cheap token-count estimate for length-grouped batching: characters / 4 plus the image tokens."""
        return sum(len(text) for _, text in self.turns) // 4 + (image_tokens if self.image is not None else 0)

    def to_json(self) -> dict[str, Any]:
        speaker = {"user": "human", "assistant": "gpt", "system": "system"}
        data: dict[str, Any] = {"id": self.id}
        if self.image is not None:
            data["image"] = self.image
        data["conversations"] = [{"from": speaker[role], "value": text} for role, text in self.turns]
        if self.boxes is not None:
            data["boxes"] = [[round(v, 6) for v in box] for box in self.boxes]
        data.update(self.extra)
        return data


def parse_conversation(data: Any, *, where: str = "record", root: Path | None = None) -> ConversationRecord:
    """Validate one decoded JSON sample; raises :class:`RecordError` naming ``where`` and the field at fault.

    Checks: roles alternate user/assistant after an optional first system turn, starting with a user turn and with
    at least one assistant turn; ``<image>`` at most once, in a user turn, and only with an ``image``; ``<region>``
    only in user turns and only with an image; ``boxes`` valid and one per ``<region>`` (or, without ``boxes``, a
    box text before every ``<region>``).
    """
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(data).__name__}")
    sample_id = data.get("id", where)
    if not isinstance(sample_id, (str, int)) or isinstance(sample_id, bool):
        raise RecordError(f"{where}: field 'id' must be a string or integer")
    where = f"{where} (id {sample_id})"
    image = data.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise RecordError(f"{where}: field 'image' must be a non-empty string (a path)")
    raw_turns = data.get("conversations")
    if not isinstance(raw_turns, list) or not raw_turns:
        raise RecordError(f"{where}: field 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    turns: list[tuple[str, str]] = []
    for index, turn in enumerate(raw_turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RecordError(f"{where}: conversations[{index}] must be an object with a string 'value'")
        role = ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise RecordError(
                f"{where}: conversations[{index}].from={turn.get('from')!r}; expected one of {sorted(ROLES)}"
            )
        turns.append((role, turn["value"]))
    _check_roles(turns, where)
    images_in_text = sum(text.count(IMAGE_TOKEN) for _, text in turns)
    if any(IMAGE_TOKEN in text or REGION_TOKEN in text for role, text in turns if role != "user"):
        raise RecordError(f"{where}: {IMAGE_TOKEN} and {REGION_TOKEN} may only appear in human turns")
    if image is None and images_in_text:
        raise RecordError(f"{where}: the text has {IMAGE_TOKEN} but the sample has no 'image'")
    if images_in_text > 1:
        raise RecordError(f"{where}: {images_in_text} {IMAGE_TOKEN} tokens; a sample holds one image")
    record = ConversationRecord(
        id=str(sample_id),
        turns=turns,
        image=image,
        extra={k: v for k, v in data.items() if k not in ("id", "image", "conversations", "boxes")},
        root=root,
    )
    regions = record.num_regions
    if regions and image is None:
        raise RecordError(f"{where}: {REGION_TOKEN} needs an image (the prompter reads the image's features)")
    raw_boxes = data.get("boxes")
    if raw_boxes is not None:
        if not isinstance(raw_boxes, list):
            raise RecordError(f"{where}: field 'boxes' must be a list of [x1, y1, x2, y2] boxes")
        try:
            record.boxes = [list(validate_box(box, where=f"{where}: boxes[{i}]")) for i, box in enumerate(raw_boxes)]
        except (BoxError, TypeError, ValueError) as error:
            raise RecordError(str(error)) from error
        if len(record.boxes) != regions:
            raise RecordError(f"{where}: {len(record.boxes)} boxes for {regions} {REGION_TOKEN} tokens")
    else:
        for role, text in turns:
            if role == "user" and any(m.group("box") is None for m in _REGION_WITH_BOX.finditer(text)):
                raise RecordError(
                    f"{where}: a {REGION_TOKEN} is not preceded by a box like '[12, 34, 560, 780]' and the sample "
                    "has no 'boxes'"
                )
    return record


def _check_roles(turns: list[tuple[str, str]], where: str) -> None:
    roles = [role for role, _ in turns]
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        raise RecordError(f"{where}: a system turn may only come first")
    if not body or body[0] != "user":
        raise RecordError(f"{where}: the conversation must start with a human turn (after an optional system turn)")
    for index, role in enumerate(body):
        if role != ("user" if index % 2 == 0 else "assistant"):
            raise RecordError(f"{where}: human and gpt turns must alternate (turn {index} is {role!r})")
    if "assistant" not in body:
        raise RecordError(f"{where}: no gpt turn, nothing to learn")


# ----- reading and writing -----------------------------------------------------------------------------------------


def conversation_read_report() -> ReadReport:
    """An empty :class:`~cloc_encoder.data.format.ReadReport` for :func:`read_conversations`."""
    return ReadReport(noun="conversations")


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted([*path.glob("*.json"), *path.glob("*.jsonl")])
        if not files:
            raise FileNotFoundError(f"{path}: folder holds no *.json / *.jsonl conversation files")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{path}: conversation file not found")
    return [path]


def _raw_samples(file: Path) -> Iterator[tuple[str, Any]]:
    """``(where, decoded sample)`` pairs; a JSON file is a list of samples, a JSONL file one sample per line."""
    if file.suffix == ".jsonl":
        with open(file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        yield f"{file}:{number}", json.loads(line)
                    except json.JSONDecodeError as error:
                        yield f"{file}:{number}", RecordError(f"{file}:{number}: invalid JSON ({error.msg})")
        return
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RecordError(f"{file}: invalid JSON ({error.msg} at line {error.lineno})") from error
    if not isinstance(data, list):
        raise RecordError(f"{file}: expected a JSON list of conversation samples (LLaVA format)")
    for index, sample in enumerate(data):
        yield f"{file}[{index}]", sample


def read_conversations(
    path: str | os.PathLike[str],
    *,
    image_folder: str | os.PathLike[str] | None = None,
    strict: bool = False,
    report: ReadReport | None = None,
) -> list[ConversationRecord]:
    """Read a LLaVA-style JSON list, a JSONL file, or a folder of them (sorted by name).

    Relative image paths resolve against ``image_folder``, else the data file's folder. Malformed samples raise
    :class:`RecordError` when ``strict``, otherwise they are skipped and listed in ``report``.
    """
    report = report if report is not None else conversation_read_report()
    records = []
    for file in _data_files(Path(path)):
        root = Path(image_folder) if image_folder is not None else file.parent
        for where, sample in _raw_samples(file):
            try:
                if isinstance(sample, RecordError):
                    raise sample
                record = parse_conversation(sample, where=where, root=root)
            except RecordError as error:
                if strict:
                    raise
                report.skipped.append(str(error))
                continue
            report.records += 1
            records.append(record)
    return records


def write_conversations(samples: Iterable[dict[str, Any] | ConversationRecord], path: str | os.PathLike[str]) -> int:
    """Write samples atomically: a JSON list for ``*.json`` (LLaVA's layout), one object per line otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = [s.to_json() if isinstance(s, ConversationRecord) else s for s in samples]
    if path.suffix == ".json":
        text = "[\n" + ",\n".join(json.dumps(item, ensure_ascii=False) for item in items) + "\n]\n"
    else:
        text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    atomic_write_text(path, text)
    return len(items)


# ----- converters from region-text records --------------------------------------------------------------------------


@dataclass
class ConversionReport:
    """Counts of a conversion: conversations per ``task`` field (``"grounding+referring"`` for a mixed one), turns
    per task, regions left out and why."""

    records: int = 0
    conversations: Counter = field(default_factory=Counter)
    turns: Counter = field(default_factory=Counter)
    left_out: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        kinds = ", ".join(f"{kind}: {n}" for kind, n in self.conversations.items())
        turns = ", ".join(f"{task}: {n}" for task, n in self.turns.items())
        left = ", ".join(f"{n} {why}" for why, n in sorted(self.left_out.items())) or "none"
        return (
            f"{self.records} records → {sum(self.conversations.values())} conversations [{kinds}], turns [{turns}]; "
            f"left out: {left}"
        )


def _rng(seed: int, record_id: str, task: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(record_id.encode("utf-8")), zlib.crc32(task.encode("utf-8"))])


def _turns_for(
    record: RegionTextRecord,
    task: str,
    codec_name: str,
    expression: str,
    wordings: Sequence[str],
    seed: int,
    report: ConversionReport,
) -> list[tuple[str, str, list[list[float]], int | None]]:
    """``(question, answer, boxes of the question's <region>s, region index)`` for every turn of one task on one
    record (the index is ``None`` for a caption).

    Each turn is asked in one of ``wordings`` (drawn from ``(seed, record id, task)``), with that wording's box codec
    (the model's, ``codec_name``, unless the wording asks for floats)."""
    rng = _rng(seed, record.id, task)
    wording_rng = _rng(seed, record.id, f"{task}-wording")
    turns: list[tuple[str, str, list[list[float]], int | None]] = []
    if task == "caption":
        if record.caption.strip():
            turns.append((CAPTION_QUESTION, record.caption.strip(), [], None))
        else:
            report.left_out["images without a caption"] += 1
        return turns
    for index, region in enumerate(record.regions):
        expressions = [e.strip() for e in region.expressions if e.strip()]
        wording = get_wording(wordings[int(wording_rng.integers(len(wordings)))])
        codec = get_box_codec(wording.box_codec or codec_name)
        if task == "grounding":
            if not expressions:  # a caption alone may not single the region out ("the red circle" twice)
                report.left_out["regions without an expression (grounding)"] += 1
                continue
            if expression == "first":
                chosen = expressions[:1]
            elif expression == "random":
                chosen = [expressions[int(rng.integers(len(expressions)))]]
            else:
                chosen = expressions
            for text in chosen:
                turns.append((wording.grounding_question(text), codec.encode(region.box), [], index))
        else:  # referring
            answer = region.caption.strip() or (expressions[0] if expressions else "")
            if not answer:
                report.left_out["regions without text (referring)"] += 1
                continue
            region_text = f"{codec.encode(region.box)} {REGION_TOKEN}"
            turns.append((wording.referring_question(region_text), answer, [list(region.box)], index))
    return turns


def _wordings_by_task(
    wordings: Sequence[str] | Mapping[str, Sequence[str]], tasks: Sequence[str]
) -> dict[str, tuple[str, ...]]:
    """``wordings`` as one list of names per task (a plain list applies to every task), checked."""
    if isinstance(wordings, Mapping):
        extra = [task for task in wordings if task not in TASKS]
        if extra:
            raise ValueError(f"wordings given for unknown task(s) {extra}; choose from {list(TASKS)}")
        by_task = {task: tuple(wordings.get(task, (DEFAULT_WORDING,))) for task in tasks}
    else:
        by_task = {task: tuple(wordings) for task in tasks}
    for task, names in by_task.items():
        unknown = [w for w in names if w not in WORDINGS]
        if unknown or not names:
            raise ValueError(f"unknown or no wording(s) {list(names)} for {task}; choose from {sorted(WORDINGS)}")
    return by_task


def _cut_into_conversations(turns: Sequence[tuple], size: int) -> list[list[tuple]]:
    """``turns`` (``(task, question, answer, boxes, region index)``, in asking order) cut into conversations of at
    most ``size`` turns, none of which asks twice about one region: each turn joins the first conversation with room
    that has not asked about its region yet, else starts a new one.

    A conversation that gave a region's box in one question and then asked where that object is (or the reverse)
    would teach the answer's shortcut of copying the earlier turn instead of looking at the image: trained so, the
    model answered "Where is X?" after "What is [region0]?" with region0's box in 64% of held-out scenes
    (docs/benchmarks.md, seventh round; 8% once cut so, eighth round)."""
    chunks: list[list[tuple]] = []
    for turn in turns:
        region = turn[4]
        home = next(
            (c for c in chunks if len(c) < size and (region is None or all(t[4] != region for t in c))),
            None,
        )
        if home is None:
            chunks.append([turn])
        else:
            home.append(turn)
    return chunks


def conversations_from_record(
    record: RegionTextRecord,
    *,
    tasks: Sequence[str] = TASKS,
    codec: str = DEFAULT_BOX_CODEC,
    max_turns: int = 1,
    mix_tasks: bool = False,
    expression: str = "random",
    wordings: Sequence[str] | Mapping[str, Sequence[str]] = (DEFAULT_WORDING,),
    seed: int = 0,
    image: str | None = None,
    report: ConversionReport | None = None,
) -> list[dict[str, Any]]:
    """Conversations (JSON-ready dicts) of one region-text record.

    Args:
        tasks: any of ``grounding``, ``referring``, ``caption``.
        codec: box codec name; must equal the model's ``config.box_codec``.
        max_turns: question/answer pairs per conversation at most; 0 = all in one. With one pair per conversation
            they follow the record's region order, with more the turns are shuffled (seeded by ``seed`` and the
            record) and no conversation asks twice about one region (a referring question and a grounding question
            of the same object go to different conversations, so the second answer cannot be copied from the
            first); ``0`` keeps every turn in one conversation as asked.
        mix_tasks: ``False``: one task per conversation; ``True``: the turns of all ``tasks`` are shuffled together
            before they are cut into conversations, so that one conversation may ask a referring question and then
            a grounding one (the demo's flow). The ``task`` field of a mixed conversation lists its tasks joined by
            ``+`` (``"grounding+referring"``), in :data:`TASKS` order.
        expression: grounding text per region: ``"random"`` (one, drawn from ``(seed, record id)``), ``"first"``,
            or ``"all"`` (one turn each).
        wordings: names in :data:`mllm.prompts.WORDINGS`, or a mapping from task to names (a task it leaves out is
            asked in the default wording); each turn is asked in one of its task's names, drawn uniformly by
            ``(seed, record id, task)`` (a name listed twice is drawn twice as often; ``("default",)``: "Where is
            ...?" / "What is ...?" only).
        image: the image path to write (default: the record's ``image`` as it is).
    """
    report = report if report is not None else ConversionReport()
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    if expression not in ("random", "first", "all"):
        raise ValueError(f"expression={expression!r}; expected 'random', 'first' or 'all'")
    if max_turns < 0:
        raise ValueError(f"max_turns must be >= 0, got {max_turns}")
    wordings_by_task = _wordings_by_task(wordings, tasks)
    groups: list[tuple[str, list[tuple[str, str, str, list[list[float]]]]]] = []
    for task in tasks:
        turns = _turns_for(record, task, codec, expression, wordings_by_task[task], seed, report)
        groups.append((task, [(task, *turn) for turn in turns]))
    if mix_tasks:
        groups = [("mixed", [turn for _, turns in groups for turn in turns])]
    samples = []
    for name, turns in groups:
        if max_turns != 1 and len(turns) > 1:
            # Several turns per conversation: ask in a seeded random order, so that a turn's position (the first
            # question is the one evaluation asks) says nothing about which region it is about.
            order = _rng(seed, record.id, f"{name}-order").permutation(len(turns))
            turns = [turns[i] for i in order]
        chunks = _cut_into_conversations(turns, max_turns) if max_turns else [turns] if turns else []
        for number, chunk in enumerate(chunks):
            conversation, boxes = [], []
            for position, (_, question, answer, question_boxes, _) in enumerate(chunk):
                prefix = f"{IMAGE_TOKEN}\n" if position == 0 else ""
                conversation.append({"from": "human", "value": prefix + question})
                conversation.append({"from": "gpt", "value": answer})
                boxes.extend(question_boxes)
            chunk_tasks = {task for task, *_ in chunk}
            task_field = "+".join(task for task in TASKS if task in chunk_tasks)
            sample: dict[str, Any] = {
                "id": f"{record.id}-{name}-{number}",
                "image": image if image is not None else record.image,
                "conversations": conversation,
            }
            if boxes:
                sample["boxes"] = [[round(v, 6) for v in box] for box in boxes]
            sample.update(task=task_field, width=record.width, height=record.height)
            samples.append(sample)
            report.conversations[task_field] += 1
            for task, *_ in chunk:
                report.turns[task] += 1
    return samples


def conversations_from_records(
    records: Iterable[RegionTextRecord],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    image_paths: str = "relative",
    report: ConversionReport | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Conversations of many records (options as :func:`conversations_from_record`).

    ``image_paths``: ``"relative"`` writes each image path relative to ``out_dir`` (the output file's folder, which
    the reader resolves them against), ``"absolute"`` writes absolute paths.
    """
    if image_paths not in ("relative", "absolute"):
        raise ValueError(f"image_paths={image_paths!r}; expected 'relative' or 'absolute'")
    report = report if report is not None else ConversionReport()
    samples = []
    for record in records:
        report.records += 1
        path = record.image_path.resolve()
        if image_paths == "relative" and out_dir is not None:
            image = os.path.relpath(path, Path(out_dir).resolve())
        else:
            image = str(path)
        samples.extend(conversations_from_record(record, image=Path(image).as_posix(), report=report, **options))
    return samples


def parse_wordings(values: Sequence[str]) -> list[str] | dict[str, list[str]]:
    """``--wordings`` values: ``["default,ferret"]`` → one list for every task; ``["grounding=default,lmms_eval",
    "referring=default"]`` → names per task. Mixing the two forms is a ``ValueError``."""

    def names(text: str) -> list[str]:
        return [w.strip() for w in text.split(",") if w.strip()]

    per_task = ["=" in value for value in values]
    if not any(per_task):
        return [name for value in values for name in names(value)]
    if not all(per_task):
        raise ValueError(f"--wordings {list(values)}: give either one list for all tasks or TASK=NAMES for each")
    by_task: dict[str, list[str]] = {}
    for value in values:
        task, _, rest = value.partition("=")
        by_task.setdefault(task.strip(), []).extend(names(rest))
    return by_task


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (see the module docstring). Exit status 0 on success, 1 when nothing was converted, 2 on a
    missing input."""
    parser = argparse.ArgumentParser(
        prog="python -m train.mllm_conversations",
        description="Region-text JSONL (docs/data_format.md) → LLaVA-style conversations with region boxes",
    )
    parser.add_argument("--data", required=True, type=Path, help="region-text JSONL file or folder of shards")
    parser.add_argument("--out", required=True, type=Path, help="output: *.json (a JSON list, LLaVA) or *.jsonl")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: grounding,referring,caption")
    parser.add_argument("--codec", default=DEFAULT_BOX_CODEC, help="box codec of the model (int999 or float)")
    parser.add_argument("--max-turns", type=int, default=1, help="question/answer pairs per conversation (0: all)")
    parser.add_argument("--mix-tasks", action="store_true", help="let one conversation ask questions of several tasks")
    parser.add_argument("--expression", choices=("random", "first", "all"), default="random")
    parser.add_argument(
        "--wordings",
        action="append",
        help=f"comma-separated question wordings, one drawn per turn: {','.join(WORDINGS)} (default: default); "
        "TASK=NAMES (repeatable) sets one task's, e.g. --wordings grounding=default,lmms_eval",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-paths", choices=("relative", "absolute"), default="relative")
    args = parser.parse_args(argv)
    try:
        records = read_region_text(args.data)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report = ConversionReport()
    try:
        samples = conversations_from_records(
            records,
            out_dir=args.out.parent,
            image_paths=args.image_paths,
            report=report,
            tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
            codec=get_box_codec(args.codec).name,
            max_turns=args.max_turns,
            mix_tasks=args.mix_tasks,
            expression=args.expression,
            wordings=parse_wordings(args.wordings or [DEFAULT_WORDING]),
            seed=args.seed,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    if not samples:
        print("error: no conversation was produced; nothing written", file=sys.stderr)
        return 1
    write_conversations(samples, args.out)
    print(f"wrote {len(samples)} conversations to {args.out}")
    return 0


__all__ = [
    "ROLES",
    "TASKS",
    "ConversationRecord",
    "ConversionReport",
    "conversation_read_report",
    "conversations_from_record",
    "conversations_from_records",
    "main",
    "parse_conversation",
    "parse_wordings",
    "read_conversations",
    "write_conversations",
]


if __name__ == "__main__":
    sys.exit(main())
