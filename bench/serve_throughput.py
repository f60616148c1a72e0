"""Serving throughput: vLLM with the CLOC-LLaVA plugin against ``serve.api``, same model, same machine, one run.

Both servers are started on the same model folder (by default the tiny random CLOC-LLaVA of the vLLM tests, whose
LLM has head_dim 64 as vLLM's CPU attention needs), one after the other, and fed the same chat requests (an image
and 0, 1 or 3 regions each, through each server's regions extension) with the official ``openai`` client at each
concurrency level. Reported per server and level: requests/s and completion tokens/s (wall clock over all requests
of the level), and the vLLM / serve.api ratios.

    python -m bench.serve_throughput                           # concurrency 1, 8, 32; 64 requests per level
    python -m bench.serve_throughput --model DIR --requests 128 --max-tokens 64 --out runs/serve_throughput.json

Needs ``.venv-vllm`` (``bash scripts/setup_vllm.sh``). vLLM runs in float32 on CPU here (``--vllm-arg`` adds
arguments, e.g. ``--vllm-arg=--dtype=bfloat16`` on a GPU); serve.api on its default device.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai

from bench.chat_servers import REPO, VLLM_MISSING_REASON, VLLM_PYTHON, Server, start_vllm_server, stop_server
from bench.vllm_tiny import CASES, ChatCase, extra_body, messages, save_tiny_vllm_model
from cloc_encoder.distributed import free_port


def start_serve_api(model_dir: Path, log: Path, name: str = "tiny", timeout_s: float = 300) -> Server:
    """``python -m serve.api`` on the model, waiting until ``/health`` answers."""
    import urllib.error
    import urllib.request

    port = free_port()
    command = [sys.executable, "-m", "serve.api", "--model", str(model_dir), "--port", str(port), "--model-name", name]
    handle = log.open("w")
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve.api exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return Server(f"http://127.0.0.1:{port}", name, process, log)
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"serve.api did not start in {timeout_s} s")


def request_kwargs(case: ChatCase, server_kind: str, max_tokens: int) -> dict[str, Any]:
    """One chat request; the regions travel as each server documents (docs/serving.md)."""
    body = extra_body(case.regions) if server_kind == "vllm" else {"regions": case.regions}
    return {"messages": messages(case), "temperature": 0, "max_tokens": max_tokens, "extra_body": body}


def run_level(server: Server, kind: str, concurrency: int, requests: int, max_tokens: int) -> dict[str, float]:
    """``requests`` requests at ``concurrency`` in flight; requests/s and completion tokens/s over the wall time."""
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    prepared = [request_kwargs(CASES[i % len(CASES)], kind, max_tokens) for i in range(requests)]

    def one(kwargs: dict[str, Any]) -> int:
        response = client.chat.completions.create(model=server.model, **kwargs)
        return response.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, prepared))
    seconds = time.perf_counter() - start
    return {
        "requests": requests,
        "seconds": seconds,
        "completion_tokens": tokens,
        "requests_per_s": requests / seconds,
        "tokens_per_s": tokens / seconds,
    }


def bench_server(
    start: Callable[[], Server], kind: str, levels: list[int], requests: int, max_tokens: int
) -> dict[int, dict[str, float]]:
    server = start()
    try:
        run_level(server, kind, 1, 2, max_tokens)  # warm-up
        out = {}
        for level in levels:
            out[level] = run_level(server, kind, level, max(requests, level), max_tokens)
            stats = out[level]
            print(
                f"{kind:9s} concurrency {level:3d}: {stats['requests_per_s']:7.2f} req/s "
                f"{stats['tokens_per_s']:8.1f} tok/s ({stats['requests']} requests, {stats['seconds']:.1f} s)",
                flush=True,
            )
        return out
    finally:
        stop_server(server)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="CLOC-LLaVA folder (default: the tiny test model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per level (at least the concurrency)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--vllm-arg", action="append", default=[], help="extra `vllm serve` argument (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not VLLM_PYTHON.exists():
        parser.error(VLLM_MISSING_REASON)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or save_tiny_vllm_model(Path(tmp) / "tiny-cloc-llava")
        logs = Path(tmp)
        results: dict[str, Any] = {"model": str(args.model or "tiny (bench/vllm_tiny.py)"), "servers": {}}
        results["servers"]["vllm"] = bench_server(
            lambda: start_vllm_server(model, logs / "vllm.log", extra_args=["--dtype", "float32", *args.vllm_arg]),
            "vllm", args.concurrency, args.requests, args.max_tokens,
        )  # fmt: skip
        results["servers"]["serve.api"] = bench_server(
            lambda: start_serve_api(model, logs / "serve_api.log"),
            "serve.api", args.concurrency, args.requests, args.max_tokens,
        )  # fmt: skip
    print("\nconcurrency | vLLM req/s | serve.api req/s | ratio | vLLM tok/s | serve.api tok/s | ratio")
    for level in args.concurrency:
        v, s = results["servers"]["vllm"][level], results["servers"]["serve.api"][level]
        print(
            f"{level:11d} | {v['requests_per_s']:10.2f} | {s['requests_per_s']:15.2f} | "
            f"{v['requests_per_s'] / s['requests_per_s']:5.2f} | {v['tokens_per_s']:10.1f} | "
            f"{s['tokens_per_s']:15.1f} | {v['tokens_per_s'] / s['tokens_per_s']:5.2f}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
