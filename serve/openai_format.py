"""OpenAI chat-completions requests → engine calls, and engine results → OpenAI responses (used by :mod:`serve.api`).

Request fields read: ``messages`` (roles ``system``/``developer``, ``user``, ``assistant``; content a string or
parts ``{"type": "text"}`` / ``{"type": "image_url", "image_url": {"url": ...}}``), ``temperature`` (default 0:
greedy), ``top_p``, ``max_tokens`` / ``max_completion_tokens`` (default 128), ``n`` (1 only), ``stream``,
``stream_options.include_usage``, and the extensions ``regions``: a list of ``[x1, y1, x2, y2]`` boxes that user
texts refer to as ``[region0]``, ``[region1]``, ... (one list for the whole conversation), and ``box_format``:
``"normalized"`` (default; every value in ``[0, 1]``) or ``"pixels"`` (of the image). A box reaching outside the
image is refused, never clipped. ``model`` and other fields are accepted and ignored. Responses add the extension
``grounded_boxes``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from serve.boxes import Box, GroundedBox, normalise_boxes, to_pixels
from serve.engine import ChatEngine, InputError, SamplingSettings, Turn
from serve.image_sources import IPNetwork, fetch_url, read_local_file

DEFAULT_MAX_TOKENS = 128


class APIError(Exception):
    """An error answered to the client in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from: data URIs always; files under ``local_files_root`` and public http(s) URLs only
    when enabled (:mod:`serve.image_sources`).

    ``local_files_root``: the folder server-side files are read from (``--allow-local-files ROOT``; ``None``: no
    files); it is resolved here and must be a folder (``ValueError`` otherwise). ``remote_timeout_s``: one deadline
    for a whole download. ``allowed_networks``: address ranges (``"10.0.0.0/8"``) a download may reach although
    they are not public, e.g. an internal image host; cloud metadata addresses stay refused.
    """

    local_files_root: str | os.PathLike[str] | None = None
    allow_remote_urls: bool = False
    remote_timeout_s: float = 10.0
    allowed_networks: tuple[str, ...] = ()
    _networks: tuple[IPNetwork, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.local_files_root is not None:
            root = Path(self.local_files_root).expanduser()
            if not root.is_dir():
                raise ValueError(f"{root}: not a folder (the root for --allow-local-files)")
            object.__setattr__(self, "local_files_root", root.resolve(strict=True))
        try:
            networks = tuple(ipaddress.ip_network(n, strict=False) for n in self.allowed_networks)
        except ValueError as error:
            raise ValueError(f"a network to allow is not an address range: {error}") from error
        object.__setattr__(self, "_networks", networks)

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        """:attr:`allowed_networks` parsed."""
        return self._networks


@dataclass
class ChatRequest:
    """A parsed chat-completions request, ready for :meth:`ChatEngine.prepare`."""

    image: Image.Image | None
    history: list[Turn]
    message: str
    regions: list[list[float]]
    settings: SamplingSettings
    system: str | None = None
    stream: bool = False
    include_usage: bool = False


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{name}' must be a number, got {value!r}", param=name)
    return float(value)


def _integer(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {value!r}", param=name)
    return value


def _parts(content: Any, where: str) -> tuple[str, list[str]]:
    """A message's text and its image URLs."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    texts, images = [], []
    for index, part in enumerate(content):
        name = f"{where}.content[{index}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise APIError(400, f"{name} must be an object with a 'type'", param=name)
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"{name}.text must be a string", param=name)
            texts.append(part["text"])
        elif part["type"] == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str) or not url:
                raise APIError(400, f"{name}.image_url.url must be a non-empty string", param=name)
            images.append(url)
        else:
            raise APIError(400, f"{name}: part type {part['type']!r} is not supported (text, image_url)", param=name)
    return "\n".join(texts), images


def _data_uri(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise APIError(400, "image data URIs must be base64: data:image/png;base64,...", param="image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise APIError(400, f"the image data URI is not valid base64: {error}", param="image_url") from error


def image_source(url: str, policy: ImagePolicy, max_bytes: int) -> bytes:
    """The encoded bytes an ``image_url`` names: a data URI; an http(s) URL, fetched when ``policy`` allows; a
    server-side path or ``file://`` URL, read from under the policy's root when it allows. Raises :class:`APIError`.
    """
    if url.startswith("data:"):
        return _data_uri(url)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    try:
        if scheme in ("http", "https"):
            if not policy.allow_remote_urls:
                raise APIError(
                    400,
                    "fetching image URLs is disabled on this server (start it with --allow-remote-urls)",
                    "image_url",
                )
            return fetch_url(url, max_bytes, policy.remote_timeout_s, policy.networks)
        if scheme in ("file", "") or len(scheme) == 1:  # file://, a plain path, or a Windows drive letter
            if policy.local_files_root is None:
                raise APIError(
                    400,
                    "reading server-side files is disabled on this server (send the image as a data URI, or start "
                    "the server with --allow-local-files ROOT)",
                    param="image_url",
                )
            return read_local_file(url, Path(policy.local_files_root), max_bytes)
    except InputError as error:
        raise APIError(400, f"image_url: {error}", param="image_url") from error
    raise APIError(400, f"unsupported image URL scheme {scheme!r}; send a data:image/...;base64 URI", "image_url")


def _open(engine: ChatEngine, url: str, policy: ImagePolicy) -> Image.Image:
    source = image_source(url, policy, engine.max_image_bytes)
    try:
        return engine.open_image(source)
    except InputError as error:
        raise APIError(400, f"image: {error}", param="image_url") from error


def _regions(raw: list[Any], box_format: str, image_size: tuple[int, int] | None) -> list[Box]:
    """The request's ``regions`` checked and normalised (:func:`serve.boxes.normalise_boxes`); 400 otherwise."""
    try:
        return normalise_boxes(raw, box_format, image_size)
    except InputError as error:
        param = "box_format" if str(error).startswith("box_format") else "regions"
        raise APIError(400, str(error), param=param) from error


def parse_chat_request(body: Any, engine: ChatEngine, policy: ImagePolicy) -> ChatRequest:
    """Check a decoded request body and turn it into a :class:`ChatRequest`; raises :class:`APIError` (4xx)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    if _integer(body, "n") not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    systems, turns, image_urls = [], [], []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        role = {"developer": "system"}.get(message.get("role"), message.get("role"))
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"{where}: role {message.get('role')!r} is not supported", param=f"{where}.role")
        text, images = _parts(message.get("content"), where)
        if images and role != "user":
            raise APIError(400, f"{where}: images are accepted in user messages only", param=where)
        image_urls.extend(images)
        if role == "system":
            systems.append(text)
        elif turns and turns[-1][0] == role:  # consecutive messages of one role are joined
            turns[-1] = (role, f"{turns[-1][1]}\n{text}")
        else:
            turns.append((role, text))
    if len(image_urls) > 1:
        raise APIError(400, f"one image per conversation is supported, got {len(image_urls)}", param="messages")
    if not any(role == "user" for role, _ in turns):
        raise APIError(400, "the messages hold no user message", param="messages")
    if turns[0][0] != "user" or turns[-1][0] != "user":
        raise APIError(400, "the conversation must start and end with a user message", param="messages")
    raw_regions = body.get("regions") or []
    if not isinstance(raw_regions, list):
        raise APIError(400, "'regions' must be a list of [x1, y1, x2, y2] boxes", param="regions")
    box_format = body.get("box_format", "normalized")
    if not isinstance(box_format, str):
        raise APIError(400, "'box_format' must be 'normalized' or 'pixels'", param="box_format")
    max_tokens = _integer(body, "max_completion_tokens")
    max_tokens = _integer(body, "max_tokens") if max_tokens is None else max_tokens
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    stream_options = body.get("stream_options") or {}
    pixels = box_format == "pixels"
    regions = [] if pixels else _regions(raw_regions, box_format, None)  # cheap checks before the image
    image = _open(engine, image_urls[0], policy) if image_urls else None
    if pixels:
        regions = _regions(raw_regions, box_format, image.size if image is not None else None)
    try:
        settings = SamplingSettings(_number(body, "temperature", 0.0), _number(body, "top_p", 1.0), max_tokens)
        history = [engine.make_turn(turns[i][1], regions, turns[i + 1][1].strip()) for i in range(0, len(turns) - 1, 2)]
        engine.expand_regions(turns[-1][1], regions)  # checked here, so every error is a 400
    except InputError as error:
        raise APIError(400, str(error)) from error
    return ChatRequest(
        image=image,
        history=history,
        message=turns[-1][1],
        regions=[list(box) for box in regions],
        settings=settings,
        system="\n".join(systems) if systems else None,
        stream=bool(body.get("stream", False)),
        include_usage=isinstance(stream_options, dict) and bool(stream_options.get("include_usage")),
    )


def boxes_json(boxes: list[GroundedBox], image: Image.Image | None) -> list[dict[str, Any]]:
    """The ``grounded_boxes`` extension: phrase, normalised box and (with an image) pixel box."""
    out = []
    for grounded in boxes:
        item: dict[str, Any] = {"phrase": grounded.phrase, "box": [round(v, 6) for v in grounded.box]}
        if image is not None:
            item["box_pixels"] = [round(v, 2) for v in to_pixels(grounded.box, image.size)]
        out.append(item)
    return out


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion(
    cid: str, model: str, text: str, finish_reason: str, usage: dict[str, int], boxes: list[dict[str, Any]]
) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": usage,
        "grounded_boxes": boxes,
    }


def chunk(cid: str, model: str, delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> dict:
    """A ``chat.completion.chunk`` object (``extra``: top-level extension fields)."""
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        **extra,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


__all__ = [
    "APIError",
    "ChatRequest",
    "ImagePolicy",
    "boxes_json",
    "chunk",
    "completion",
    "completion_id",
    "image_source",
    "parse_chat_request",
    "usage",
]
