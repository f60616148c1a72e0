"""MLLM training data: conversations → model inputs with assistant-only labels, a length-grouped resumable sampler,
and the collate function.

Tokenisation goes through the processor's chat template — the same template string and the same
``processor(images, text, boxes)`` call as inference — and only assistant tokens carry the loss:

1. the conversation is rendered by the processor's template; its ``{% generation %}`` blocks mark the assistant
   replies (``assistant_mask="generation"``, default), or the replies are found by rendering each turn's inference
   prompt (``add_generation_prompt=True``) and taking what the next turn adds to it (``assistant_mask="prefix"``,
   for templates without generation blocks);
2. the rendered text is tokenised; tokens that overlap a reply are labels, everything else is ``-100``;
3. checks, each raising :class:`LabelMaskingError` naming the sample (LLaVA only warned "tokenization mismatch"
   and trained on loss 0): there are supervised tokens; for each assistant turn the inference prompt's tokens are a
   prefix of the training tokens and its supervised tokens start exactly where that prompt ends (so what the model
   learns to continue is what it will see at inference); the processor's expanded ``input_ids`` equal the
   tokenised text with each ``<image>`` expanded (image tokens never carry labels).

Unreadable images are skipped and counted (the next record in data-set order takes the place, as in CLOC
pretraining); samples longer than ``max_length`` are cut after the last image and region token when replies
remain to learn from, otherwise skipped and counted. A record that fails in any other per-sample way
(:data:`SAMPLE_ERRORS`: a label mask that cannot be built, a processor or template that rejects it) is skipped and
counted in the same way as *invalid*; the trainer stops when more than a set fraction is (see
:func:`check_invalid_budget`), so a systematic template bug stays loud. Other exceptions (programming errors)
propagate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jinja2.exceptions import TemplateError
from PIL import Image
from torch.utils.data import Dataset
from transformers.utils.chat_template_utils import render_jinja_template

from cloc_encoder.data.images import IMAGE_ERRORS
from train.mllm.conversations import ConversationRecord
from train.samplers import SampleKey

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
ASSISTANT_MASKS = ("generation", "prefix")


class LabelMaskingError(ValueError):
    """The chat template and the label mask disagree for a sample; the message names the sample and what differs."""


class SampleTooLong(ValueError):
    """A sample cannot be cut to ``max_length`` (its image/region tokens or every reply lie beyond it)."""


class InvalidSample(ValueError):
    """A record that cannot become a training sample (re-raised for a record that failed before)."""


class TooManyInvalidSamples(RuntimeError):
    """More training samples were invalid than ``max_invalid_fraction`` allows (names the count and first reasons)."""


SAMPLE_ERRORS: tuple[type[Exception], ...] = (ValueError, TemplateError)
"""What one bad record raises while it is encoded: :class:`LabelMaskingError` and the processor's and tokenizer's
checks (``ValueError``), a template's ``raise_exception`` (``TemplateError``). ``TypeError``, ``KeyError``,
``AttributeError`` and the like are programming errors and propagate."""
INVALID_EXAMPLES = 5
"""How many invalid samples are named in the log and in the error."""


@dataclass
class EncodedConversation:
    """One tokenised sample. ``input_ids``/``labels`` ``(L,)`` (``<image>`` expanded; labels ``-100`` except on
    assistant tokens), ``pixel_values`` ``(1, 3, S, S)`` or ``None``, ``region_boxes`` ``(R, 4)`` model frame."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    region_boxes: torch.Tensor
    text: str
    truncated: bool = False

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


# ----- label masking -------------------------------------------------------------------------------------------------


def _render(processor: Any, messages: list[dict[str, Any]], with_spans: bool) -> tuple[str, list[tuple[int, int]]]:
    """The template's text for ``messages`` and, with ``with_spans``, the character spans of its generation blocks.

    Renders exactly as ``processor.apply_chat_template`` does (same template string, the tokenizer's special tokens
    as template variables) — checked against it by :func:`encode_conversation`.
    """
    rendered, spans = render_jinja_template(
        conversations=[messages],
        chat_template=processor.chat_template,
        return_assistant_tokens_mask=with_spans,
        **processor.tokenizer.special_tokens_map,
    )
    return rendered[0], [tuple(span) for span in (spans[0] if with_spans else [])]


def _token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Tokens overlapping a character span (transformers' rule for ``return_assistant_tokens_mask``)."""
    mask = []
    for start, end in offsets:
        mask.append(end > start and any(end > s and start < e for s, e in spans))
    return mask


def _runs(mask: Sequence[bool]) -> list[tuple[int, int]]:
    """Maximal ``[start, end)`` runs of ``True``."""
    runs, start = [], None
    for index, value in enumerate([*mask, False]):
        if value and start is None:
            start = index
        elif not value and start is not None:
            runs.append((start, index))
            start = None
    return runs


def _describe(tokenizer: Any, ids: Sequence[int], at: int) -> str:
    window = list(ids[max(0, at - 3) : at + 3])
    return repr(tokenizer.decode(window, skip_special_tokens=False))


def encode_conversation(
    processor: Any,
    messages: list[dict[str, Any]],
    image: Image.Image | None = None,
    boxes: Sequence[Sequence[float]] | None = None,
    *,
    sample_id: str = "sample",
    max_length: int | None = None,
    assistant_mask: str = "generation",
) -> EncodedConversation:
    """Tokenise one conversation for training (see the module docstring for the checks).

    Args:
        processor: a :class:`~mllm.CLOCLlavaProcessor` (its chat template and tokenizer are used).
        messages: chat-template messages (``{"role", "content"}``); an image is a ``{"type": "image"}`` part.
        image: the sample's image (required when ``messages`` hold an image part).
        boxes: normalised original-frame boxes, one per ``<region>`` in order (``None``: read from the text).
        max_length: cut longer samples (see :class:`SampleTooLong`).
        assistant_mask: ``"generation"`` (the template's ``{% generation %}`` blocks) or ``"prefix"``.

    Raises:
        LabelMaskingError: the template and the label mask disagree (message names ``sample_id``).
        SampleTooLong: the sample cannot be cut to ``max_length``.
    """
    if assistant_mask not in ASSISTANT_MASKS:
        raise ValueError(f"assistant_mask={assistant_mask!r}; expected one of {ASSISTANT_MASKS}")
    tokenizer = processor.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("training needs a fast tokenizer (character offsets for the label mask)")
    name = f"sample {sample_id!r}"
    assistant_turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if not assistant_turns:
        raise LabelMaskingError(f"{name}: no assistant turn, nothing to learn")

    text, spans = _render(processor, messages, with_spans=assistant_mask == "generation")
    if text != processor.apply_chat_template(messages):
        raise LabelMaskingError(f"{name}: rendering differs from processor.apply_chat_template (template changed?)")
    prompts = [processor.apply_chat_template(messages[:turn], add_generation_prompt=True) for turn in assistant_turns]
    if assistant_mask == "prefix":
        spans = []
        for turn, prompt in zip(assistant_turns, prompts, strict=True):
            through = processor.apply_chat_template(messages[: turn + 1])
            if not (through.startswith(prompt) and text.startswith(through)):
                raise LabelMaskingError(
                    f"{name}: the rendered reply of turn {turn} does not extend its inference prompt "
                    f"({prompt[-40:]!r}); the template is not prefix-stable, so assistant_mask='prefix' cannot work"
                )
            spans.append((len(prompt), len(through)))

    encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids: list[int] = list(encoding["input_ids"])
    mask = _token_mask(encoding["offset_mapping"], spans)
    runs = _runs(mask)
    if not runs:
        hint = (
            "the chat template marks no assistant tokens (it has no {% generation %} blocks?); use a template "
            "with them (chat_template=vicuna_v1) or assistant_mask=prefix"
            if assistant_mask == "generation"
            else "the replies rendered to no tokens"
        )
        raise LabelMaskingError(f"{name}: zero supervised tokens for {len(assistant_turns)} assistant turn(s): {hint}")
    if len(runs) != len(assistant_turns):
        raise LabelMaskingError(
            f"{name}: {len(runs)} supervised token spans for {len(assistant_turns)} assistant turns; the template's "
            "generation blocks do not match the turns"
        )
    for index, ((start, _), prompt) in enumerate(zip(runs, prompts, strict=True)):
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if ids[: len(prompt_ids)] != list(prompt_ids):
            at = next(
                (i for i, (a, b) in enumerate(zip(ids, prompt_ids, strict=False)) if a != b),
                min(len(ids), len(prompt_ids)),
            )
            raise LabelMaskingError(
                f"{name}: the inference prompt of assistant turn {index + 1} is not a token prefix of the training "
                f"sequence (first difference at token {at}: training {_describe(tokenizer, ids, at)} vs prompt "
                f"{_describe(tokenizer, prompt_ids, at)}); the reply would be learned after a different context "
                "than the one generation sees"
            )
        if start != len(prompt_ids):
            raise LabelMaskingError(
                f"{name}: the supervised tokens of assistant turn {index + 1} start at token {start} but its "
                f"inference prompt ends at token {len(prompt_ids)} (near {_describe(tokenizer, ids, start)}); the "
                "template's generation block and add_generation_prompt disagree"
            )

    # Expand <image> as the processor does; image tokens never carry labels.
    image_id, region_id = processor.image_token_id, processor.region_token_id
    if any(token in (image_id, region_id) for token, supervised in zip(ids, mask, strict=True) if supervised):
        raise LabelMaskingError(f"{name}: an <image> or <region> token lies inside an assistant reply")
    expanded, labels = [], []
    for token, supervised in zip(ids, mask, strict=True):
        if token == image_id:
            expanded.extend([token] * processor.image_seq_length)
            labels.extend([IGNORE_INDEX] * processor.image_seq_length)
        else:
            expanded.append(token)
            labels.append(token if supervised else IGNORE_INDEX)
    features = processor(
        images=[image] if image is not None else None,
        text=[text],
        boxes=[list(boxes)] if boxes is not None else None,
    )
    input_ids = features["input_ids"][0]
    if input_ids.tolist() != expanded:
        raise LabelMaskingError(
            f"{name}: the processor's input_ids ({len(input_ids)} tokens) differ from the tokenised template text with "
            f"<image> expanded ({len(expanded)} tokens); the label mask would be misaligned"
        )
    region_boxes = features.get("region_boxes", torch.zeros(0, 4))
    labels_tensor = torch.tensor(labels, dtype=torch.long)
    truncated = False
    if max_length is not None and len(expanded) > max_length:
        input_ids, labels_tensor, truncated = input_ids[:max_length], labels_tensor[:max_length], True
        kept_images = int((input_ids == image_id).sum())
        if kept_images != int((features["input_ids"][0] == image_id).sum()):
            raise SampleTooLong(f"{name}: {len(expanded)} tokens; max_length={max_length} cuts its image tokens")
        if not bool((labels_tensor[1:] != IGNORE_INDEX).any()):
            raise SampleTooLong(f"{name}: {len(expanded)} tokens; max_length={max_length} cuts every reply")
        region_boxes = region_boxes[: int((input_ids == region_id).sum())]
    return EncodedConversation(
        input_ids=input_ids.long(),
        labels=labels_tensor,
        pixel_values=features.get("pixel_values"),
        region_boxes=region_boxes.float().reshape(-1, 4),
        text=text,
        truncated=truncated,
    )


# ----- the data set --------------------------------------------------------------------------------------------------


class ConversationDataset(Dataset):
    """Conversation records → tokenised samples with labels (keys ``(epoch, index)`` or an index).

    Args:
        records: from :func:`train.mllm.conversations.read_conversations`.
        processor: the MLLM processor (chat template, tokenizer, image processor).
        max_length: token cap per sample (``None``: no cap).
        assistant_mask: see :func:`encode_conversation`.
    """

    def __init__(
        self,
        records: Sequence[ConversationRecord],
        processor: Any,
        *,
        max_length: int | None = None,
        assistant_mask: str = "generation",
    ) -> None:
        if not records:
            raise ValueError("the conversation data set is empty")
        self.records = list(records)
        self.processor = processor
        self.max_length = max_length
        self.assistant_mask = assistant_mask
        self._unusable: dict[int, tuple[str, str]] = {}  # index → (kind, reason), per process

    def __len__(self) -> int:
        return len(self.records)

    @property
    def lengths(self) -> list[int]:
        """Estimated tokens per sample (for length-grouped batching)."""
        tokens = self.processor.image_seq_length or 0
        return [record.estimated_length(tokens) for record in self.records]

    def load_image(self, record: ConversationRecord) -> Image.Image | None:
        if record.image_path is None:
            return None
        with Image.open(record.image_path) as image:
            image.load()
            return image.convert("RGB")

    def encode(self, index: int) -> EncodedConversation:
        """Sample ``index``; raises ``OSError`` (unreadable image), :class:`SampleTooLong` or one of
        :data:`SAMPLE_ERRORS` (an invalid record; :class:`InvalidSample` once it has failed in ``__getitem__``)."""
        if index in self._unusable:
            kind, reason = self._unusable[index]
            raise {"image": OSError, "length": SampleTooLong, "invalid": InvalidSample}[kind](reason)
        record = self.records[index]
        try:
            image = self.load_image(record)
        except IMAGE_ERRORS as error:
            reason = f"{type(error).__name__}: {error}"
            self._unusable[index] = ("image", reason)
            logger.warning("skipping unreadable image of sample %s (%s): %s", record.id, record.image_path, reason)
            raise OSError(reason) from error
        try:
            return encode_conversation(
                self.processor,
                record.messages(),
                image,
                record.boxes,
                sample_id=record.id,
                max_length=self.max_length,
                assistant_mask=self.assistant_mask,
            )
        except SampleTooLong as error:
            self._unusable[index] = ("length", str(error))
            logger.warning("skipping %s", error)
            raise

    def __getitem__(self, key: SampleKey | int) -> dict[str, Any]:
        """The sample at ``key``, or the next usable one in data-set order; what was skipped on the way is listed
        under ``skipped`` (images), ``too_long`` and ``invalid`` (counted by the trainer in the main process)."""
        _, index = key if isinstance(key, tuple) else (0, key)
        skipped: list[str] = []
        too_long: list[str] = []
        invalid: list[str] = []
        for attempt in range(len(self.records)):
            candidate = (index + attempt) % len(self.records)
            record = self.records[candidate]
            try:
                sample = self.encode(candidate)
            except SampleTooLong as error:
                too_long.append(str(error))
                continue
            except OSError as error:  # unreadable image (encode re-raises every image error as OSError)
                skipped.append(f"{record.id} ({record.image_path}): {error}")
                continue
            except SAMPLE_ERRORS as error:
                invalid.append(self._invalid(candidate, error))
                continue
            return {
                "id": record.id,
                "input_ids": sample.input_ids,
                "labels": sample.labels,
                "pixel_values": sample.pixel_values,
                "region_boxes": sample.region_boxes,
                "skipped": skipped,
                "too_long": too_long,
                "invalid": invalid,
            }
        unusable = skipped + too_long + invalid
        raise RuntimeError(f"none of the {len(self.records)} samples could be used: {unusable[:3]}")

    def _invalid(self, index: int, error: Exception) -> str:
        """Remember that record ``index`` is invalid; returns the reason, naming the record."""
        record = self.records[index]
        reason = str(error) if isinstance(error, InvalidSample) else f"{type(error).__name__}: {error}"
        if record.id not in reason:
            reason = f"sample {record.id!r}: {reason}"
        self._unusable[index] = ("invalid", reason)
        return reason

    def check_usable(self, probe: int = INVALID_EXAMPLES) -> None:
        """Encode samples in order until one is usable; raise the first error when the first ``probe`` invalid
        records come before any usable one (a template / label-mask mismatch then fails before training starts).
        Unreadable images and over-long samples are passed over, as in training."""
        first: Exception | None = None
        failures = 0
        for index in range(len(self.records)):
            try:
                self.encode(index)
                return
            except (SampleTooLong, OSError):
                continue
            except SAMPLE_ERRORS as error:
                first, failures = first or error, failures + 1
                if failures >= probe:
                    break
        if first is not None:
            raise first
        raise RuntimeError(f"none of the {len(self.records)} samples could be used (unreadable images, too long)")


def check_invalid_budget(
    invalid: int,
    drawn: int,
    dataset_size: int,
    fraction: float,
    examples: Callable[[], Sequence[str]] = tuple,
) -> None:
    """Raise :class:`TooManyInvalidSamples` when more than ``fraction`` of the samples were invalid: of the data set,
    or of the ``drawn`` samples (used + skipped) when more, since every epoch meets the same invalid records again.

    Args:
        invalid: invalid samples skipped so far (all ranks).
        drawn: samples the run has drawn so far (all ranks).
        dataset_size: records in the training data.
        fraction: the largest tolerated fraction (``max_invalid_fraction``).
        examples: the first reasons, named in the error; called only when raising (every rank raises together when
            the counts are summed over ranks, so it may be collective).
    """
    base = max(drawn, dataset_size)
    allowed = fraction * base
    if invalid > allowed:
        named = "; ".join(list(examples())[:INVALID_EXAMPLES]) or "see the rank logs"
        raise TooManyInvalidSamples(
            f"{invalid} training samples were invalid and skipped, more than max_invalid_fraction={fraction:g} "
            f"allows ({allowed:.1f} of {base} samples): a systematic template or data problem? First: {named}"
        )


# ----- batching ------------------------------------------------------------------------------------------------------


@dataclass
class MLLMBatch:
    """A collated batch: ``inputs`` are exactly the keyword arguments of the model's ``forward`` (with ``labels``)."""

    inputs: dict[str, torch.Tensor]
    ids: list[str]
    skipped: list[str] = field(default_factory=list)
    too_long: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)

    @property
    def num_supervised(self) -> int:
        """Tokens whose label is a target after the causal shift."""
        return int((self.inputs["labels"][:, 1:] != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        return int(self.inputs["attention_mask"].sum())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> MLLMBatch:
        """Move tensors to ``device``; ``dtype`` (bf16 under DeepSpeed) applies to ``pixel_values`` only."""
        moved = {key: value.to(device) for key, value in self.inputs.items()}
        if dtype is not None and "pixel_values" in moved:
            moved["pixel_values"] = moved["pixel_values"].to(dtype)
        return MLLMBatch(inputs=moved, ids=self.ids, skipped=self.skipped, too_long=self.too_long, invalid=self.invalid)


@dataclass(frozen=True)
class CollateConfig:
    """What :func:`collate_conversations` needs to know about the model."""

    pad_token_id: int
    image_token_id: int
    region_token_id: int
    image_seq_length: int
    image_size: int
    keep_towers_busy: bool = True


def collate_conversations(samples: Sequence[dict[str, Any]], config: CollateConfig) -> MLLMBatch:
    """Right-pad samples into one batch.

    ``inputs``: ``input_ids``/``attention_mask``/``labels`` ``(B, L)``, ``pixel_values`` ``(I, 3, S, S)`` (the
    samples that have an image, in order), ``region_boxes`` ``(R, 4)`` model frame and ``region_image_index``
    ``(R,)`` (index into ``pixel_values``).

    With ``keep_towers_busy`` a batch without images gets one blank image, and a batch without regions one region,
    on masked positions appended after row 0 (attention mask 0, labels ``-100``: no effect on the loss or on other
    tokens). Every step then runs the vision tower, the prompter and both projectors, which ZeRO-3 (its parameter
    gathers are collectives every rank must join in the same order) and DDP (every trainable parameter must get a
    gradient) need when another rank's batch has images or regions.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    rows = [s["input_ids"].tolist() for s in samples]
    label_rows = [s["labels"].tolist() for s in samples]
    masks = [[1] * len(row) for row in rows]
    images = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    boxes, image_index = [], []
    image_number = 0
    for sample in samples:
        if sample["pixel_values"] is not None:
            count = len(sample["region_boxes"])
            if count:
                boxes.append(sample["region_boxes"])
                image_index.extend([image_number] * count)
            image_number += 1
    pad = config.pad_token_id
    if config.keep_towers_busy:
        if not images:
            images.append(torch.zeros(1, 3, config.image_size, config.image_size))
            _append_masked(rows, label_rows, masks, [config.image_token_id] * config.image_seq_length, pad)
        if not boxes:
            boxes.append(torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
            image_index.append(0)
            _append_masked(rows, label_rows, masks, [config.region_token_id], pad)
    width = max(len(row) for row in rows)
    inputs: dict[str, torch.Tensor] = {
        "input_ids": torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=torch.long),
        "attention_mask": torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.long),
        "labels": torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in label_rows], dtype=torch.long),
    }
    if images:
        inputs["pixel_values"] = torch.cat(images)
    if boxes:
        inputs["region_boxes"] = torch.cat(boxes).float()
        inputs["region_image_index"] = torch.tensor(image_index, dtype=torch.long)
    return MLLMBatch(
        inputs=inputs,
        ids=[s["id"] for s in samples],
        skipped=[m for s in samples for m in s.get("skipped", [])],
        too_long=[m for s in samples for m in s.get("too_long", [])],
        invalid=[m for s in samples for m in s.get("invalid", [])],
    )


def _append_masked(
    rows: list[list[int]], labels: list[list[int]], masks: list[list[int]], tokens: list[int], pad: int
) -> None:
    """Append ``tokens`` to row 0 after every row's real tokens (padding row 0 up to the longest row first)."""
    width = max(len(row) for row in rows)
    padding = width - len(rows[0])
    rows[0] = rows[0] + [pad] * padding + tokens
    labels[0] = labels[0] + [IGNORE_INDEX] * (padding + len(tokens))
    masks[0] = masks[0] + [0] * (padding + len(tokens))


__all__ = [
    "ASSISTANT_MASKS",
    "IGNORE_INDEX",
    "INVALID_EXAMPLES",
    "SAMPLE_ERRORS",
    "CollateConfig",
    "ConversationDataset",
    "EncodedConversation",
    "InvalidSample",
    "LabelMaskingError",
    "MLLMBatch",
    "SampleTooLong",
    "TooManyInvalidSamples",
    "check_invalid_budget",
    "collate_conversations",
    "encode_conversation",
]
