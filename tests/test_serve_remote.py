"""The demo and the terminal chat against a remote server (``--server``): a real ``python -m serve.api`` on a tiny
model gives the same greedy answers as the in-process engine, regions included; request bodies for vLLM."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from serve import InputError
from serve.backends import RemoteBackend
from serve.demo import DemoHandlers, DemoState
from serve.demo_canvas import display_copy
from serve.engine import ChatEngine, SamplingSettings
from tests.tiny_serving import png_bytes, save_tiny_chat_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_folder(chat_tokenizer, tmp_path_factory):
    return save_tiny_chat_model(chat_tokenizer, tmp_path_factory.mktemp("remote") / "tiny")


@pytest.fixture(scope="module")
def server_url(model_folder):
    command = [sys.executable, "-m", "serve.api", "--model", str(model_folder), "--port", "0", "--device", "cpu"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+/v1)", line)
        assert match, line
        yield match.group(1)
    finally:
        process.terminate()
        process.wait(timeout=30)


def run_cli(args: list[str], lines: list[str]) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "serve.cli", *args, "--max-new-tokens", "8"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cli_with_server_answers_as_the_local_engine(model_folder, server_url, tmp_path):
    image = tmp_path / "img.png"
    Image.new("RGB", (64, 48), (30, 120, 200)).save(image)
    lines = ["What is [8, 8, 40, 40]?", "And [0.5, 0.5, 1, 1] next to [0, 0, 0.5, 0.5]?", "/regions", "Describe it."]
    local = run_cli(["--model", str(model_folder), "--image", str(image), "--device", "cpu"], lines)
    remote = run_cli(["--server", server_url, "--image", str(image)], lines)
    assert local.count("ASSISTANT: ") == 3 and "region 2: [0, 0, 32, 24] px" in local
    assert remote == local  # the same answers (greedy), boxes listed, regions kept across turns


def test_cli_with_an_unreachable_server_exits_2(tmp_path, capsys):
    from serve.cli import main

    image = tmp_path / "img.png"
    image.write_bytes(png_bytes())
    assert main(["--server", "http://127.0.0.1:9/v1", "--image", str(image), "--timeout", "5"]) == 2
    assert "cannot list the models of http://127.0.0.1:9/v1" in capsys.readouterr().err


def test_demo_with_server_streams_the_local_answer(model_folder, server_url):
    engine = ChatEngine.load(model_folder, device="cpu")
    remote = RemoteBackend(server_url)
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    answers = []
    for backend in (engine, remote):
        handlers = DemoHandlers(backend)
        state = DemoState(image=image, display=display_copy(image), regions=[(0.1, 0.1, 0.6, 0.9)])
        for message in ("What is [region0]?", "and now?"):
            *_, last = handlers.respond(message, state, 0.0, 1.0, 8)
            assert last[-1] == "", last[-1]  # no warning
        answers.append([turn[2] for turn in state.turns])
    assert answers[1] == answers[0] and all(answers[0])
    assert remote.grounded_boxes("the dog [100, 200, 300, 400].")[0].phrase == "the dog"


def test_server_refusals_are_input_errors(server_url):
    remote = RemoteBackend(server_url, model="whatever")
    image = Image.new("RGB", (32, 32))
    with pytest.raises(InputError, match=r"refused the request \(400\).*<image>"):
        remote.prepare(image, [], "look: <image>", settings=SamplingSettings(max_new_tokens=2))
    with pytest.raises(InputError, match=r"\[region1\] refers to an unknown region"):
        remote.prepare(image, [], "[region1]?", [(0, 0, 1, 1)])


def test_vllm_request_body_renumbers_regions_across_turns():
    remote = RemoteBackend("http://127.0.0.1:9", kind="vllm", model="cloc-llava")
    history = [("What is [region0]?", [(0.0, 0.0, 0.5, 0.5), (0.1, 0.1, 0.2, 0.2)], "a cat")]
    body = remote.request(
        Image.new("RGB", (8, 8)), history, "Is [region1] left of [region0]?", [(0.5, 0, 1, 1), (0, 0.5, 1, 1)]
    )
    assert body["extra_body"] == {
        "add_special_tokens": True,
        "mm_processor_kwargs": {"regions": [[0.0, 0.0, 0.5, 0.5], [0.0, 0.5, 1.0, 1.0], [0.5, 0.0, 1.0, 1.0]]},
    }
    first, answer, last = body["messages"]
    assert first["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert first["content"][1]["text"] == "What is [region0]?" and answer == {"role": "assistant", "content": "a cat"}
    assert last == {"role": "user", "content": "Is [region1] left of [region2]?"}
    assert body["temperature"] == 0.0 and "top_p" not in body
    serve_api = RemoteBackend("http://127.0.0.1:9", model="m").request(None, [], "hello")
    assert serve_api["extra_body"] == {} and serve_api["messages"] == [{"role": "user", "content": "hello"}]
    with pytest.raises(InputError, match="regions need an image"):
        remote.request(None, [], "[region0]", [(0, 0, 1, 1)])
