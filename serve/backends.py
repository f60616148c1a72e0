"""What the demo and the terminal chat talk to: the in-process :class:`~serve.engine.ChatEngine` (the default) or a
remote OpenAI-compatible server (:class:`RemoteBackend`: ``serve.api`` or vLLM with the project's plugin).

Both implement :class:`ChatBackend`: ``prepare(image, history, message, regions, settings, system)`` checks the
inputs and returns a :class:`Reply` to iterate (the growing answer text, then ``.text``); ``make_turn`` gives the
history item to keep; ``grounded_boxes`` parses an answer's boxes with :func:`serve.boxes.grounded_boxes` (the same
code for both); ``open_image`` and ``draw`` work on local images.

A remote conversation is sent whole with every message, as OpenAI chat requests are: the image as a ``data:`` URL
in the first user message, earlier turns as user/assistant messages, and every region of the conversation in one
list whose boxes the user text refers to as ``[regionK]`` (each turn's references renumbered by the regions before
it). That list travels as ``serve.api``'s ``regions`` field (``--server-kind serve-api``) or as vLLM's
``mm_processor_kwargs.regions`` with ``add_special_tokens: true`` (``--server-kind vllm``); docs/serving.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from PIL import Image

from mllm.box_codec import BOX_CODECS, DEFAULT_BOX_CODEC, get_box_codec
from serve import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, InputError, one_line
from serve.boxes import Box, GroundedBox, check_box, draw_boxes, grounded_boxes
from serve.engine import HistoryItem, SamplingSettings, Turn
from serve.images import load_image

SERVER_KINDS = ("serve-api", "vllm")
MAX_ANSWER_CHARS = 1_000_000
"""A remote answer longer than this is cut (the stream is closed)."""
DEFAULT_TIMEOUT_S = 300.0
"""One deadline for a whole remote answer (connecting, waiting for the first token, streaming)."""
PNG_LIMIT_BYTES = 8 * 1024 * 1024
"""Images are sent as lossless PNG; one whose PNG is larger goes as a JPEG (quality 95) instead."""
REGION_TOKEN = "<region>"
_REFERENCE = re.compile(r"\[\s*[Rr]egion\s*(\d+)\s*\]")


class Reply(Protocol):
    """An answer being produced: iterate once for the growing text (each item extends the previous one); then
    :attr:`text` is the whole answer. Closing the iterator early stops it."""

    text: str

    def __iter__(self) -> Iterator[str]: ...


class ChatBackend(Protocol):
    """What the demo and the terminal chat call (:class:`~serve.engine.ChatEngine` and :class:`RemoteBackend`)."""

    name: str

    @property
    def region_token(self) -> str: ...

    def open_image(self, source: bytes | str | os.PathLike[str] | Image.Image) -> Image.Image: ...

    def prepare(
        self,
        image: Image.Image | None,
        history: Sequence[HistoryItem],
        message: str,
        regions: Sequence[Sequence[float]] = (),
        settings: SamplingSettings | None = None,
        system: str | None = None,
    ) -> Reply: ...

    def make_turn(self, message: str, regions: Sequence[Sequence[float]], answer: str) -> Turn: ...

    def grounded_boxes(self, answer: str) -> list[GroundedBox]: ...

    def draw(
        self, image: Image.Image, boxes: Sequence[GroundedBox], regions: Sequence[Sequence[float]] = ()
    ) -> Image.Image: ...


def image_data_url(image: Image.Image) -> str:
    """``image`` as a ``data:`` URL: PNG (lossless, so the server decodes the very pixels the local engine would
    see), or JPEG quality 95 when the PNG is over :data:`PNG_LIMIT_BYTES`."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    kind = "png"
    if buffer.tell() > PNG_LIMIT_BYTES:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=95)
        kind = "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _renumber(text: str, boxes: Sequence[Sequence[float]], sent: list[Box], where: str) -> str:
    """``text`` with each ``[regionK]`` rewritten to index ``sent`` (the conversation's list of regions so far),
    appending ``boxes[K]`` to ``sent`` the first time this text refers to it; only referenced regions are sent."""
    placed: dict[int, int] = {}

    def replace(match: re.Match[str]) -> str:
        index = int(match.group(1))
        if index >= len(boxes):
            given = f"region0..region{len(boxes) - 1}" if boxes else "none"
            raise InputError(f"{where}: {match.group(0)} refers to an unknown region; regions given: {given}")
        if index not in placed:
            placed[index] = len(sent)
            sent.append(check_box(boxes[index], where=f"{where}: region{index}"))
        return f"[region{placed[index]}]"

    return _REFERENCE.sub(replace, text)


class RemoteReply:
    """A streamed remote answer (see :class:`Reply`); :attr:`finish_reason` is set at the end."""

    def __init__(self, stream: Any, deadline: float, max_chars: int = MAX_ANSWER_CHARS) -> None:
        self._stream, self._deadline, self._max_chars = stream, deadline, max_chars
        self.text = ""
        self.finish_reason: str | None = None
        self._started = False

    def __iter__(self) -> Iterator[str]:
        import openai

        if self._started:
            raise RuntimeError("a reply can be read once")
        self._started = True
        raw = ""
        try:
            for chunk in self._stream:
                if time.monotonic() > self._deadline:
                    raise InputError("the server did not finish the answer in time")
                for choice in chunk.choices or ():
                    raw += choice.delta.content or ""
                    self.finish_reason = choice.finish_reason or self.finish_reason
                if len(raw) > self._max_chars:
                    raw, self.finish_reason = raw[: self._max_chars], "length"
                    break
                if raw.strip() and raw.lstrip() != self.text:
                    self.text = raw.lstrip()
                    yield self.text
        except openai.APIError as error:
            raise InputError(f"the server failed during the answer: {one_line(error)}") from error
        finally:
            self._stream.close()
        self.text = raw.strip()


class RemoteBackend:
    """A CLOC-LLaVA behind an OpenAI-compatible server (module docstring). ``kind`` is ``"serve-api"`` or
    ``"vllm"``; ``model`` defaults to the server's first model; ``box_codec`` must be the served model's
    (``CLOCLlavaConfig.box_codec``) for grounded boxes to parse. Raises :class:`~serve.InputError` when the server
    cannot be reached."""

    def __init__(
        self,
        base_url: str,
        kind: str = "serve-api",
        model: str | None = None,
        api_key: str | None = None,
        box_codec: str = DEFAULT_BOX_CODEC,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        max_image_bytes: int = MAX_IMAGE_BYTES,
    ) -> None:
        import openai

        if kind not in SERVER_KINDS:
            raise ValueError(f"server kind {kind!r}; expected one of {', '.join(SERVER_KINDS)}")
        url = base_url.rstrip("/")
        if not url.endswith("/v1"):
            url += "/v1"
        self.kind, self.codec, self.timeout_s = kind, get_box_codec(box_codec), timeout_s
        self.max_image_pixels, self.max_image_bytes = max_image_pixels, max_image_bytes
        key = api_key or os.environ.get("OPENAI_API_KEY") or "unused"
        self.client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=timeout_s)
        if model is None:
            try:
                models = self.client.models.list().data
            except openai.APIError as error:
                raise InputError(f"cannot list the models of {url}: {one_line(error)}") from error
            if not models:
                raise InputError(f"{url} serves no model")
            model = models[0].id
        self.model = model
        self.name = f"{model} ({kind} at {url})"

    @property
    def region_token(self) -> str:
        return REGION_TOKEN

    def open_image(self, source: bytes | str | os.PathLike[str] | Image.Image) -> Image.Image:
        return load_image(source, self.max_image_pixels, self.max_image_bytes)

    def make_turn(self, message: str, regions: Sequence[Sequence[float]], answer: str) -> Turn:
        """The history item: the message as typed (``[regionK]`` references) with its checked boxes."""
        if not isinstance(message, str) or not message.strip():
            raise InputError("the message is empty")
        boxes = tuple(check_box(box, where=f"region{k}") for k, box in enumerate(regions))
        _renumber(message, boxes, [], "the message")
        return Turn(message.strip(), boxes, answer)

    def request(
        self,
        image: Image.Image | None,
        history: Sequence[HistoryItem],
        message: str,
        regions: Sequence[Sequence[float]] = (),
        settings: SamplingSettings | None = None,
        system: str | None = None,
    ) -> dict[str, Any]:
        """The chat-completions request body (keyword arguments of ``client.chat.completions.create``)."""
        settings = settings or SamplingSettings()
        turns: list[tuple[str, tuple[Box, ...], str | None]] = []
        for item in history:
            if len(item) == 2:
                user, assistant = item  # type: ignore[misc]
                turns.append((user, (), assistant))
            else:
                user, boxes, assistant = item  # type: ignore[misc]
                turns.append((user, tuple(boxes), assistant))
        last = self.make_turn(message, regions, "")
        turns.append((last.user, last.boxes, None))
        all_boxes: list[Box] = []
        messages: list[dict[str, Any]] = [] if system is None else [{"role": "system", "content": system}]
        for index, (user, boxes, assistant) in enumerate(turns):
            where = "the message" if assistant is None else f"history turn {index}"
            text = _renumber(user, boxes, all_boxes, where)  # expanded text ([..] <region>) has no references
            if index == 0 and image is not None:
                url = image_data_url(image)
                content: Any = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
                messages.append({"role": "user", "content": content})
            else:
                messages.append({"role": "user", "content": text})
            if assistant is not None:
                messages.append({"role": "assistant", "content": assistant})
        if all_boxes and image is None:
            raise InputError("regions need an image")
        extra: dict[str, Any] = {}
        regions_json = [list(box) for box in all_boxes]
        if self.kind == "vllm":
            extra["add_special_tokens"] = True
            if regions_json:
                extra["mm_processor_kwargs"] = {"regions": regions_json}
        elif regions_json:
            extra["regions"] = regions_json
        sampling = {"temperature": float(settings.temperature), "max_tokens": int(settings.max_new_tokens)}
        if settings.temperature > 0:
            sampling["top_p"] = float(settings.top_p)
        return {"model": self.model, "messages": messages, **sampling, "extra_body": extra}

    def prepare(
        self,
        image: Image.Image | None,
        history: Sequence[HistoryItem],
        message: str,
        regions: Sequence[Sequence[float]] = (),
        settings: SamplingSettings | None = None,
        system: str | None = None,
    ) -> RemoteReply:
        """Send the request and return the streaming reply; a refusal of the server (4xx, with its message) or a
        failure to reach it raises :class:`~serve.InputError`."""
        import openai

        body = self.request(image, history, message, regions, settings, system)
        deadline = time.monotonic() + self.timeout_s
        try:
            stream = self.client.chat.completions.create(**body, stream=True)
        except openai.APIStatusError as error:
            detail = error.body.get("message") if isinstance(error.body, dict) else None
            raise InputError(f"the server refused the request ({error.status_code}): {detail or error}") from error
        except openai.APIError as error:
            raise InputError(f"cannot reach the server: {one_line(error)}") from error
        return RemoteReply(stream, deadline)

    def grounded_boxes(self, answer: str) -> list[GroundedBox]:
        return grounded_boxes(answer, self.codec)

    def draw(
        self, image: Image.Image, boxes: Sequence[GroundedBox], regions: Sequence[Sequence[float]] = ()
    ) -> Image.Image:
        return draw_boxes(image, boxes, regions)


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--server`` options shared by ``serve.cli`` and ``serve.demo``."""
    group = parser.add_argument_group("remote server (instead of loading --model in-process)")
    group.add_argument(
        "--server", default=None, metavar="URL", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1"
    )
    group.add_argument(
        "--server-kind",
        choices=SERVER_KINDS,
        default="serve-api",
        help="how regions travel: serve-api's 'regions' field, or vLLM's mm_processor_kwargs (default serve-api)",
    )
    group.add_argument("--server-model", default=None, metavar="NAME", help="model name (default: the server's first)")
    group.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY, else none)")
    group.add_argument(
        "--box-codec",
        choices=sorted(BOX_CODECS),
        default=DEFAULT_BOX_CODEC,
        help=f"the served model's box codec, to read boxes in answers (default {DEFAULT_BOX_CODEC})",
    )
    group.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per answer (default 300)")


def remote_backend(args: argparse.Namespace, max_image_pixels: int = MAX_IMAGE_PIXELS) -> RemoteBackend:
    """The :class:`RemoteBackend` that :func:`add_backend_arguments`' options describe (``args.server`` set)."""
    return RemoteBackend(
        args.server,
        args.server_kind,
        args.server_model,
        args.api_key,
        args.box_codec,
        args.timeout,
        max_image_pixels=max_image_pixels,
    )


__all__ = [
    "SERVER_KINDS",
    "ChatBackend",
    "RemoteBackend",
    "RemoteReply",
    "Reply",
    "add_backend_arguments",
    "image_data_url",
    "remote_backend",
]
