"""``vllm serve`` with the CLOC-LLaVA plugin, driven by the official ``openai`` client: the answers equal our
``generate`` (plain and streaming; 0, 1 and 3 regions through the ``regions`` extension), 16 concurrent requests
are all answered, and bad requests get a 400 with a message while the server keeps serving."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from bench.chat_servers import Server
from bench.vllm_tiny import CASES, ChatCase, extra_body, messages
from tests.vllm.conftest import TinyModel
from tests.vllm.tiny_vllm import MAX_NEW_TOKENS


def same_text(got: str | None, reference: str) -> bool:
    """vLLM's detokenizer holds back a trailing incomplete UTF-8 sequence (the random model writes byte soup)."""
    return got == reference.rstrip("\ufffd")


def token_ids(response: openai.types.chat.ChatCompletion) -> list[int]:
    """The generated token ids (vLLM's ``return_tokens_as_token_ids`` writes each logprob token as ``token_id:N``)."""
    return [int(item.token.removeprefix("token_id:")) for item in response.choices[0].logprobs.content]


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def ask(server: Server, case: ChatCase) -> openai.types.chat.ChatCompletion:
    return client(server).chat.completions.create(
        model=server.model, messages=messages(case), temperature=0, max_tokens=MAX_NEW_TOKENS, logprobs=True,
        extra_body={**extra_body(case.regions), "return_tokens_as_token_ids": True},
    )  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_chat_equals_generate(vllm_server: Server, tiny_vllm_model: TinyModel, case: ChatCase) -> None:
    ref = tiny_vllm_model.references[case.name]
    response = ask(vllm_server, case)
    assert token_ids(response) == ref["token_ids"]
    assert same_text(response.choices[0].message.content, ref["text"])
    assert response.usage.prompt_tokens == len(ref["prompt_token_ids"])  # same prompt: BOS, image tokens, regions
    assert response.usage.completion_tokens == len(ref["token_ids"])


@pytest.mark.parametrize("case", CASES[1:3], ids=[c.name for c in CASES[1:3]])
def test_streaming_equals_generate(vllm_server: Server, tiny_vllm_model: TinyModel, case: ChatCase) -> None:
    stream = client(vllm_server).chat.completions.create(
        model=vllm_server.model, messages=messages(case), temperature=0, max_tokens=MAX_NEW_TOKENS, stream=True,
        extra_body=extra_body(case.regions),
    )  # fmt: skip
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) > 1
    assert same_text("".join(pieces), tiny_vllm_model.references[case.name]["text"])


def test_sixteen_concurrent_requests(vllm_server: Server, tiny_vllm_model: TinyModel) -> None:
    cases = [CASES[i % len(CASES)] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda case: token_ids(ask(vllm_server, case)), cases))
    assert answers == [tiny_vllm_model.references[case.name]["token_ids"] for case in cases]


def post(server: Server, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{server.base_url}/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


ONE = CASES[1]  # "What is [region0]?" with one region
TWO_BARE_REGIONS = [
    {"role": "user", "content": [messages(ONE)[0]["content"][0], {"type": "text", "text": "<region> and <region>?"}]}
]
BAD_REQUESTS = {
    "box_outside": (
        {"messages": messages(ONE), **extra_body([[1.2, 1.2, 1.5, 1.5]])},
        "regions[0]: box [1.2, 1.2, 1.5, 1.5]",
    ),
    "unknown_region": (
        {"messages": messages(CASES[2]), **extra_body(ONE.regions)},
        "[region1] refers to an unknown region",
    ),
    "more_region_tokens_than_boxes": (
        {"messages": TWO_BARE_REGIONS, **extra_body(ONE.regions)},
        "2 <region> tokens but 1 regions",
    ),
    "regions_not_a_list": (
        {"messages": messages(ONE), "mm_processor_kwargs": {"regions": "everywhere"}},
        "must be a list",
    ),
    "regions_without_image": (  # refused by the renderer (--tokenizer-mode cloc_llava), not the processor
        {"messages": messages(ONE, with_image=False), **extra_body(ONE.regions)},
        "regions need an image",
    ),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_400(vllm_server: Server, tiny_vllm_model: TinyModel, name: str) -> None:
    body, expected = BAD_REQUESTS[name]
    status, answer = post(vllm_server, {"model": vllm_server.model, "max_tokens": 4, **body})
    assert 400 <= status < 500, (name, status, answer)
    assert expected in answer["error"]["message"], answer
    with urllib.request.urlopen(f"{vllm_server.base_url}/health", timeout=10) as response:
        assert response.status == 200
    assert token_ids(ask(vllm_server, ONE)) == tiny_vllm_model.references[ONE.name]["token_ids"]
