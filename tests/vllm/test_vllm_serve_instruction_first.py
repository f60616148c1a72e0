"""``vllm serve`` of a model in the synthetic-world recipe's layout — its chat template puts the question before
the image (``instruction_first``) and 2 x 2 patches make one image token: vLLM renders the OpenAI messages with the
model's own template, so the prompt and the greedy answers equal our ``generate``'s, regions before the image
included."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.chat_servers import Server, start_vllm_server, stop_server
from bench.vllm_tiny import CASES, ChatCase
from tests.vllm.conftest import TinyModel
from tests.vllm.test_vllm_serve import ask, same_text, token_ids


@pytest.fixture(scope="module")
def instruction_first_server(
    tiny_vllm_instruction_first_model: TinyModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("vllm_serve_if") / "server.log"
    server = start_vllm_server(tiny_vllm_instruction_first_model.folder, log)
    yield server
    stop_server(server)


@pytest.mark.parametrize("case", CASES[:3], ids=[c.name for c in CASES[:3]])
def test_chat_equals_generate_question_before_image(
    instruction_first_server: Server, tiny_vllm_instruction_first_model: TinyModel, case: ChatCase
) -> None:
    ref = tiny_vllm_instruction_first_model.references[case.name]
    response = ask(instruction_first_server, case)
    assert response.usage.prompt_tokens == len(ref["prompt_token_ids"])  # same prompt: BOS, question, image, regions
    assert token_ids(response) == ref["token_ids"]
    assert same_text(response.choices[0].message.content, ref["text"])
