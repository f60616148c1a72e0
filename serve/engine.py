"""The chat engine every front end shares (terminal chat, HTTP API, Gradio demo): one CLOC-LLaVA model and its
processor, multi-turn prompts rendered exactly as in training, regions in, grounded boxes out, streaming.

A conversation is about one image (or none). Its turns are rendered with the processor's chat template as training
renders them (:meth:`train.mllm_conversations.ConversationRecord.messages`): the image is a ``{"type": "image"}``
part at the start of the first user turn, every other turn is a string. A user refers to region ``k`` of the
``regions`` passed with a message as ``[region0]``, ``[region1]``, ...; :meth:`ChatEngine.expand_regions` writes
them as ``[x1, y1, x2, y2] <region>`` (``processor.format_region``) and keeps the exact boxes, which a
:class:`Turn` of the history carries so earlier regions keep their boxes.

One model, one generation at a time: :class:`ChatEngine` holds a lock while generating, so concurrent requests
queue instead of interleaving.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from cloc_encoder.image_processing import RegionOutsideInputError
from cloc_encoder.run_folder import resolve_model_folder
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
from mllm.box_codec import BOX_PATTERN
from mllm.configuration_cloc_llava import CLOCLlavaConfig
from mllm.loading import load_pretrained_model
from serve import DEFAULT_MODEL, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, InputError, ModelLoadError, one_line
from serve.boxes import Box, GroundedBox, check_box, draw_boxes, grounded_boxes, parse_region_spec
from serve.images import check_pixels, load_image

MAX_NEW_TOKENS = 4096
_REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class SamplingSettings:
    """Decoding settings. ``temperature == 0`` is greedy decoding (``top_p`` then unused)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.temperature) <= 2.0:
            raise InputError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.max_new_tokens, bool) or not 1 <= int(self.max_new_tokens) <= MAX_NEW_TOKENS:
            raise InputError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}], got {self.max_new_tokens}")

    def generate_kwargs(self) -> dict[str, Any]:
        """``model.generate`` arguments."""
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": float(self.temperature), "top_p": float(self.top_p)}


class Turn(NamedTuple):
    """One earlier round: the expanded user text (regions as ``[x1, y1, x2, y2] <region>``), the exact boxes of its
    ``<region>`` tokens in order, and the assistant's answer. A plain ``(user, boxes, assistant)`` tuple works too,
    and so does ``(user, assistant)`` (boxes then read from the box text before each ``<region>``)."""

    user: str
    boxes: tuple[Box, ...]
    assistant: str


HistoryItem = Turn | tuple[str, Sequence[Sequence[float]], str] | tuple[str, str]


class _StopOnEvent(StoppingCriteria):
    """Stops generation once ``event`` is set (the reader went away)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Generation:
    """One answer being generated. Iterate (once) for the growing answer text — each item extends the previous
    one; then :attr:`text`, :attr:`prompt_tokens`, :attr:`completion_tokens` and :attr:`finish_reason`
    (``"stop"`` or ``"length"``) are set. Closing the iterator early stops generation."""

    def __init__(self, engine: ChatEngine, inputs: dict[str, torch.Tensor], max_new_tokens: int, kwargs: dict) -> None:
        self._engine, self._inputs, self._kwargs = engine, inputs, kwargs
        self.max_new_tokens = max_new_tokens
        self.prompt_tokens = int(inputs["input_ids"].shape[1])
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text = ""
        self._started = False

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a Generation can be read once; prepare a new one")
        self._started = True
        engine = self._engine
        tokenizer = engine.processor.tokenizer
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()

        def run() -> torch.Tensor:
            try:
                return engine.model.generate(
                    **self._inputs,
                    **self._kwargs,
                    max_new_tokens=self.max_new_tokens,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]),
                    suppress_tokens=[engine.processor.image_token_id, engine.processor.region_token_id],
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            finally:
                streamer.end()  # unblocks the reader when generate fails (a second end() is harmless)

        with engine._lock:
            future = engine._executor.submit(run)
            raw = ""
            try:
                for piece in streamer:
                    raw += piece
                    if raw.strip() and raw.lstrip() != self.text:
                        self.text = raw.lstrip()
                        yield self.text
            finally:
                stop.set()
                output = future.result()  # waits for the generation thread; re-raises its error
        new = output[0, self.prompt_tokens :]
        self.completion_tokens = int(new.shape[0])
        self.text = self.text.rstrip()
        ended = self.completion_tokens > 0 and int(new[-1]) == tokenizer.eos_token_id
        self.finish_reason = "length" if not ended and self.completion_tokens >= self.max_new_tokens else "stop"


def _device(device: str | torch.device | None) -> torch.device:
    """The torch device to load on (default: CUDA when available, else CPU); ``ValueError`` for a bad name or a
    CUDA device on a machine without one."""
    try:
        chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from error
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is visible to torch")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return chosen


def _check_model_folder(folder: Path) -> None:
    """Refuse, naming the file, a folder whose ``config.json`` is not a CLOC-LLaVA config or whose safetensors
    files are damaged, before transformers builds anything: a config of another ``model_type`` would otherwise
    build a default-sized (7B) model and run out of memory. Raises :class:`~serve.ModelLoadError`."""
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{config_file}: not a readable JSON file ({one_line(error)})") from error
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != CLOCLlavaConfig.model_type:
        raise ModelLoadError(
            f"{config_file}: model_type is {model_type!r}, not {CLOCLlavaConfig.model_type!r}: not a CLOC-LLaVA "
            "model (llava-hf checkpoints convert with python -m mllm.convert_llava_hf)"
        )
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("pytorch_model*.bin")):
        raise ModelLoadError(f"{folder}: no model weights (model.safetensors)")
    for file in weights:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (OSError, SafetensorError) as error:
            raise ModelLoadError(f"{file}: not a complete safetensors file ({one_line(error)})") from error


class ChatEngine:
    """A CLOC-LLaVA model and processor behind a chat interface (see the module docstring)."""

    def __init__(
        self,
        model: CLOCLlavaForConditionalGeneration,
        processor: CLOCLlavaProcessor,
        name: str | None = None,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        max_image_bytes: int = MAX_IMAGE_BYTES,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.name = name or Path(str(getattr(model, "name_or_path", "") or "cloc-llava")).name
        self.max_image_pixels = max_image_pixels
        self.max_image_bytes = max_image_bytes
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloc-llava-generate")
        image, region = re.escape(processor.image_token), re.escape(processor.region_token)
        self._references = re.compile(
            rf"(?P<ref>\[\s*[Rr]egion\s*(?P<index>\d+)\s*\])|(?P<box>{BOX_PATTERN.pattern})\s*{region}"
            rf"|(?P<bare>{region})|(?P<image>{image})"
        )

    @property
    def region_token(self) -> str:
        """The region token the model reads (``<region>``)."""
        return self.processor.region_token

    @property
    def busy(self) -> bool:
        """Whether a generation is running (others wait for it)."""
        return self._lock.locked()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] = DEFAULT_MODEL,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        **kwargs: Any,
    ) -> ChatEngine:
        """Load a saved model folder or a training run (its latest checkpoint, ``resolve_model_folder``).

        ``device`` defaults to CUDA when available, else CPU; ``dtype`` to bfloat16 on a GPU that supports it, else
        float32. ``kwargs`` go to :class:`ChatEngine`. A missing model raises :class:`FileNotFoundError` saying how
        to get one; a folder that cannot be served raises :class:`~serve.ModelLoadError` naming the file and what
        is wrong (another ``model_type``, damaged weights, a missing tokenizer, ...); a bad ``device`` or ``dtype``
        a ``ValueError``.
        """
        given = Path(path)
        if str(path) == DEFAULT_MODEL and not given.exists() and (_REPO / DEFAULT_MODEL).exists():
            given = _REPO / DEFAULT_MODEL  # the default works from any working directory
        folder = resolve_model_folder(given)
        if not (folder / "config.json").is_file():
            hint = (
                "train it with `bash scripts/quickstart.sh` (about 12 minutes on a CPU), or pass --model PATH"
                if str(path) == DEFAULT_MODEL
                else "pass a CLOC-LLaVA folder written by save_pretrained, or a stage-2 training run folder"
            )
            raise FileNotFoundError(f"no CLOC-LLaVA model at {given}: {hint}")
        _check_model_folder(folder)
        device = _device(device)
        if dtype is None:
            cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
            dtype = torch.bfloat16 if cuda_bf16 else torch.float32
        elif isinstance(dtype, str):
            if dtype not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"dtype={dtype!r}; expected float32, bfloat16 or float16")
            dtype = getattr(torch, dtype)
        try:
            processor = CLOCLlavaProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
            raise ModelLoadError(
                f"{folder}: cannot load the processor (tokenizer.json, tokenizer_config.json, processor_config.json, "
                f"chat template): {one_line(error)}"
            ) from error
        try:
            model = load_pretrained_model(folder, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as error:
            raise ModelLoadError(f"{folder}: cannot load the model: {one_line(error)}") from error
        if kwargs.get("name") is None:
            kwargs["name"] = given.name
        return cls(model.to(device), processor, **kwargs)

    # ----- inputs -------------------------------------------------------------------------------------------------

    def open_image(self, source: bytes | str | os.PathLike[str] | Image.Image) -> Image.Image:
        """:func:`load_image` with this engine's bounds."""
        return load_image(source, self.max_image_pixels, self.max_image_bytes)

    def expand_regions(self, message: str, regions: Sequence[Sequence[float]] = ()) -> tuple[str, list[Box]]:
        """Write ``[regionK]`` references of ``message`` as ``processor.format_region(regions[K])``.

        Returns the expanded text and the exact (checked, clipped) boxes of its ``<region>`` tokens in order. A
        region already written as ``[x1, y1, x2, y2] <region>`` (box text in the model's codec) is kept, its box
        read from the text. Raises :class:`~serve.InputError` for an unknown index, a bad box, a ``<region>``
        without its box, an ``<image>`` token, or an empty message.
        """
        if not isinstance(message, str) or not message.strip():
            raise InputError("the message is empty")
        checked = [check_box(box, where=f"region{k}") for k, box in enumerate(regions)]
        boxes: list[Box] = []

        def replace(match: re.Match[str]) -> str:
            if match.group("image"):
                raise InputError(f"the message may not contain {match.group('image')}; send the image separately")
            if match.group("bare"):
                raise InputError(
                    f"{match.group('bare')} must follow its box, as in '[120, 40, 560, 900] {match.group('bare')}'; "
                    "or write [region0] and pass the box in regions"
                )
            if match.group("ref"):
                index = int(match.group("index"))
                if index >= len(checked):
                    given = f"region0..region{len(checked) - 1}" if checked else "none"
                    raise InputError(f"{match.group('ref')} refers to an unknown region; regions given: {given}")
                box = checked[index]
            else:
                parsed = self.processor.codec.parse_first_box(match.group("box"))
                box = check_box(parsed if parsed is not None else (), where=match.group("box"))
            boxes.append(box)
            return self.processor.format_region(box)

        return self._references.sub(replace, message.strip()), boxes

    def make_turn(self, message: str, regions: Sequence[Sequence[float]], answer: str) -> Turn:
        """The :class:`Turn` to append to the history after ``message`` (with ``regions``) got ``answer``."""
        text, boxes = self.expand_regions(message, regions)
        return Turn(text, tuple(boxes), answer)

    def _history_turn(self, index: int, item: HistoryItem) -> Turn:
        if len(item) == 2:
            user, assistant = item  # type: ignore[misc]
            text, boxes = self.expand_regions(user)
        else:
            user, given, assistant = item  # type: ignore[misc]
            text, boxes = self.expand_regions(user, given)
            if not any(m.group("ref") for m in self._references.finditer(user)):  # already expanded: exact boxes
                if len(boxes) != len(given):
                    raise InputError(f"history turn {index}: {len(boxes)} regions in the text, {len(given)} boxes")
                boxes = [check_box(b, where=f"history turn {index}") for b in given]
        for token in (self.processor.image_token, self.processor.region_token):
            if token in assistant:
                raise InputError(f"history turn {index}: the assistant's text may not contain {token}")
        return Turn(text, tuple(boxes), assistant.strip())

    def prompt(
        self,
        history: Sequence[HistoryItem],
        message: str,
        regions: Sequence[Sequence[float]] = (),
        with_image: bool = True,
        system: str | None = None,
    ) -> tuple[str, list[Box]]:
        """The chat-template prompt (ending with the generation prompt) and every region box of the conversation,
        in order. With ``with_image`` the image part opens the first user turn, as in training."""
        turns = [self._history_turn(i, item) for i, item in enumerate(history)]
        text, boxes = self.expand_regions(message, regions)
        users = [*(t.user for t in turns), text]
        all_boxes = [box for t in turns for box in t.boxes] + boxes
        if all_boxes and not with_image:
            raise InputError("regions need an image")
        messages: list[dict[str, Any]] = []
        if system is not None:
            for token in (self.processor.image_token, self.processor.region_token):
                if token in system:
                    raise InputError(f"the system prompt may not contain {token}")
            messages.append({"role": "system", "content": system})
        for index, user in enumerate(users):
            if index == 0 and with_image:
                messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]})
            else:
                messages.append({"role": "user", "content": user})
            if index < len(turns):
                messages.append({"role": "assistant", "content": turns[index].assistant})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), all_boxes

    # ----- generation ---------------------------------------------------------------------------------------------

    def prepare(
        self,
        image: Image.Image | None,
        history: Sequence[HistoryItem],
        message: str,
        regions: Sequence[Sequence[float]] = (),
        settings: SamplingSettings | None = None,
        system: str | None = None,
    ) -> Generation:
        """Check the inputs and build the model inputs now (raising :class:`~serve.InputError`); generation runs
        when the returned :class:`Generation` is iterated."""
        settings = settings or SamplingSettings()
        text, boxes = self.prompt(history, message, regions, with_image=image is not None, system=system)
        if image is not None:
            check_pixels(image.size, self.max_image_pixels)
            image = image.convert("RGB")
        try:
            inputs = dict(
                self.processor(images=None if image is None else [image], text=[text], boxes=[boxes] if boxes else None)
            )
        except RegionOutsideInputError as error:  # a region that the model's centre crop cuts away
            raise InputError(str(error)) from error
        parameter = next(self.model.parameters())
        inputs = {key: value.to(parameter.device) for key, value in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(parameter.dtype)
        length = int(inputs["input_ids"].shape[1])
        context = getattr(self.model.config.text_config, "max_position_embeddings", None)
        max_new_tokens = settings.max_new_tokens
        if context is not None:
            if length >= context:
                raise InputError(
                    f"the conversation is {length} tokens, the model's context is {context}; start a new conversation"
                )
            max_new_tokens = min(max_new_tokens, context - length)
        return Generation(self, inputs, max_new_tokens, settings.generate_kwargs())

    def stream(
        self,
        image: Image.Image | None,
        history: Sequence[HistoryItem],
        message: str,
        regions: Sequence[Sequence[float]] = (),
        settings: SamplingSettings | None = None,
        system: str | None = None,
    ) -> Iterator[str]:
        """Yield the growing answer text (each item extends the previous one). Inputs are checked before the first
        item; closing the iterator early stops generation."""
        yield from self.prepare(image, history, message, regions, settings, system)

    def chat(
        self,
        image: Image.Image | None,
        history: Sequence[HistoryItem],
        message: str,
        regions: Sequence[Sequence[float]] = (),
        settings: SamplingSettings | None = None,
        system: str | None = None,
    ) -> str:
        """The whole answer (see :meth:`stream`)."""
        generation = self.prepare(image, history, message, regions, settings, system)
        for _ in generation:
            pass
        return generation.text

    # ----- outputs ------------------------------------------------------------------------------------------------

    def grounded_boxes(self, answer: str) -> list[GroundedBox]:
        """Boxes in ``answer`` (normalised original frame) with their phrases (:func:`serve.boxes.grounded_boxes`)."""
        return grounded_boxes(answer, self.processor.codec)

    def draw(
        self, image: Image.Image, boxes: Sequence[GroundedBox], regions: Sequence[Sequence[float]] = ()
    ) -> Image.Image:
        """A copy of ``image`` with grounded boxes (red, with phrases) and user regions (blue)."""
        return draw_boxes(image, boxes, regions)


__all__ = [
    "DEFAULT_MODEL",
    "MAX_IMAGE_PIXELS",
    "ChatEngine",
    "Generation",
    "GroundedBox",
    "InputError",
    "SamplingSettings",
    "Turn",
    "load_image",
    "parse_region_spec",
]
