"""An LLM judge behind any OpenAI-compatible chat endpoint (OpenAI, Azure/OpenRouter proxies, vLLM, llama.cpp ...),
with retries and a reply cache, and the parser of Ferret-style "two scores on the first line" reviews.

- ``POST {base_url}/chat/completions`` with ``{"model", "messages", "temperature", "max_tokens"}`` through the
  standard library (no client package needed); ``Authorization: Bearer <key>`` when a key is given.
- Transient failures (HTTP 429 and 5xx, timeouts, refused or dropped connections) are retried with exponential
  backoff (``Retry-After`` honoured); other HTTP errors (a wrong key, model or URL) raise :class:`JudgeError` at
  once, as do transient failures that outlast the retries.
- A reply that is not a chat completion, or whose text ``parse`` rejects, is asked again (``reply_retries`` times),
  then reported as failed — never an exception.
- Accepted replies are cached in a JSONL file keyed by the SHA-256 of the request body (model, messages,
  temperature, max tokens — not the URL or key), so a rerun pays only for what is missing.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from eval.mllm_generation import PredictionStore

T = TypeVar("T")
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
_SCORE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_ASSISTANT_NUMBER = re.compile(r"(?i)\b(?:assistant|answer)\s*#?\s*[12]\b\s*[:=]?")


class JudgeError(RuntimeError):
    """The judge endpoint cannot be used (a non-retryable HTTP error, or retries exhausted)."""


@dataclass(frozen=True)
class JudgeSettings:
    """Where and how to ask the judge. ``temperature``/``max_tokens`` default to Ferret's GPT-4 review script."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    temperature: float = 0.2
    max_tokens: int = 1024
    timeout: float = 120.0
    max_retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    reply_retries: int = 2


@dataclass(frozen=True)
class Judgement:
    """The outcome of one judged request: ``parsed`` (``None`` when it failed), the reply text, why it failed, and
    whether it came from the cache."""

    parsed: Any
    content: str | None
    error: str | None = None
    cached: bool = False


def parse_two_scores(text: object) -> tuple[float, float] | None:
    """The two scores on the first non-empty line of a review (Ferret's format, ``"8 7"``), also written
    ``"8, 7"``, ``"**8** **7**"``, ``"8/10 7/10"`` or ``"Assistant 1: 8 Assistant 2: 7"``; ``None`` unless there
    are exactly two numbers in ``[0, 10]``."""
    if not isinstance(text, str):
        return None
    line = next((s for s in text.strip().splitlines() if s.strip()), "")
    line = _ASSISTANT_NUMBER.sub(" ", line).replace("/10", " ")
    numbers = _SCORE.findall(line)
    if len(numbers) != 2:
        return None
    scores = (float(numbers[0]), float(numbers[1]))
    return scores if all(0.0 <= s <= 10.0 for s in scores) else None


def request_key(body: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a request body (the cache key)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class ChatJudge:
    """Ask an OpenAI-compatible chat endpoint, retrying and caching (thread-safe; see the module docstring).

    ``requests_made`` counts HTTP requests actually sent (a fully cached rerun sends none)."""

    def __init__(
        self, settings: JudgeSettings, cache_path: str | Path | None = None, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        if not settings.base_url or not settings.model:
            raise ValueError("the judge needs a base URL and a model name (--judge-base-url, --judge-model)")
        self.settings = settings
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        self.cache = PredictionStore(cache_path) if cache_path is not None else None
        self.requests_made = 0
        self._sleep = sleep
        self._lock = threading.Lock()

    def body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """The request body for ``messages``."""
        return {
            "model": self.settings.model,
            "messages": messages,
            "temperature": self.settings.temperature,
            "max_tokens": self.settings.max_tokens,
        }

    def judge(self, messages: list[dict[str, str]], parse: Callable[[str], T | None]) -> Judgement:
        """Ask until ``parse`` accepts the reply (``1 + reply_retries`` tries); a cached accepted reply is reused.
        Raises :class:`JudgeError` only when the endpoint itself fails."""
        body = self.body(messages)
        key = request_key(body)
        with self._lock:
            cached = self.cache.predictions.get(key) if self.cache is not None else None
        if cached is not None and (parsed := parse(cached["content"])) is not None:
            return Judgement(parsed, cached["content"], cached=True)
        content, problem = None, "no reply"
        for _ in range(1 + self.settings.reply_retries):
            content = self._post(body)
            if content is None:
                problem = "the reply is not a chat completion"
                continue
            parsed = parse(content)
            if parsed is not None:
                if self.cache is not None:
                    with self._lock:
                        self.cache.append([{"id": key, "model": self.settings.model, "content": content}])
                return Judgement(parsed, content)
            problem = "the reply does not start with two scores"
        tries = 1 + self.settings.reply_retries
        return Judgement(None, content, error=f"{problem} (after {tries} tries)")

    def _post(self, body: dict[str, Any]) -> str | None:
        """One chat completion's text (``None`` when the reply is not a chat completion), retrying transient
        failures."""
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        for attempt in range(self.settings.max_retries + 1):
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            retry_after = None
            with self._lock:
                self.requests_made += 1
            try:
                with urllib.request.urlopen(request, timeout=self.settings.timeout) as response:
                    return _completion_text(response.read())
            except urllib.error.HTTPError as error:
                detail = error.read()[:300].decode("utf-8", "replace")
                if error.code not in RETRY_STATUS:
                    raise JudgeError(f"{self.url}: HTTP {error.code} {error.reason}: {detail}") from error
                failure = f"HTTP {error.code}: {detail}"
                retry_after = _seconds(error.headers.get("Retry-After"))
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as error:
                failure = f"{type(error).__name__}: {error}"
            if attempt == self.settings.max_retries:
                raise JudgeError(f"{self.url}: still failing after {attempt + 1} tries ({failure})")
            delay = self.settings.backoff * 2**attempt if retry_after is None else retry_after
            self._sleep(min(delay, self.settings.max_backoff))
        raise AssertionError("unreachable")


def _completion_text(raw: bytes) -> str | None:
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


__all__ = ["ChatJudge", "JudgeError", "JudgeSettings", "Judgement", "parse_two_scores", "request_key"]
