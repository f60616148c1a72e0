"""Fixtures of the vLLM plugin tests: a tiny CLOC-LLaVA (head_dim 64), our ``generate``'s answers for it, and a
``vllm serve`` of it. The tests run from the project's venv and drive vLLM in ``.venv-vllm`` through subprocesses;
they are skipped (with the command that builds it) only when ``.venv-vllm`` is absent."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.chat_servers import VLLM_MISSING_REASON, VLLM_PYTHON, Server, start_vllm_server, stop_server
from bench.vllm_tiny import CASES, save_tiny_vllm_model
from tests.vllm.tiny_vllm import TWO_TURNS, reference_answers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)
            if not VLLM_PYTHON.exists():
                item.add_marker(pytest.mark.skip(reason=VLLM_MISSING_REASON))


@dataclass
class TinyModel:
    folder: Path
    references: dict


@pytest.fixture(scope="session")
def tiny_vllm_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    folder = save_tiny_vllm_model(tmp_path_factory.mktemp("tiny_vllm") / "tiny-cloc-llava")
    return TinyModel(folder, reference_answers(folder, CASES))


@pytest.fixture(scope="session")
def tiny_vllm_instruction_first_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """The synthetic-world recipe's layout: the question before the image (``instruction_first``), and 2 x 2
    patches merged into each image token (``image_token_merge=2``)."""
    folder = tmp_path_factory.mktemp("tiny_vllm_if") / "tiny-cloc-llava-if"
    save_tiny_vllm_model(folder, seed=1, chat_template="instruction_first", image_token_merge=2)
    return TinyModel(folder, reference_answers(folder, [*CASES, TWO_TURNS]))


@pytest.fixture(scope="module")
def vllm_server(tiny_vllm_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_vllm_server(tiny_vllm_model.folder, tmp_path_factory.mktemp("vllm_serve") / "server.log")
    yield server
    stop_server(server)
