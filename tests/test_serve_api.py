"""The OpenAI-compatible HTTP API: the official ``openai`` client (plain and streaming), the extensions, and a 4xx
with a message for every kind of bad input."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import re
import socket
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest
from PIL import Image

from serve.api import main as api_main
from serve.api import make_server
from serve.engine import ChatEngine, SamplingSettings
from serve.openai_format import ImagePolicy
from tests.tiny_serving import png_bytes, save_tiny_chat_model

REPO = Path(__file__).resolve().parents[1]
MAX_REQUEST_BYTES = 256 * 1024
PNG = png_bytes((64, 48))
DATA_URI = "data:image/png;base64," + base64.b64encode(PNG).decode()
REGIONS = [[0.1, 0.1, 0.5, 0.5], [0.5, 0.25, 1.0, 1.0]]


@contextlib.contextmanager
def serving(engine: ChatEngine, policy: ImagePolicy | None = None):
    server = make_server(engine, "127.0.0.1", 0, policy, max_request_bytes=MAX_REQUEST_BYTES)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def engine(chat_tokenizer, tmp_path_factory):
    folder = save_tiny_chat_model(chat_tokenizer, tmp_path_factory.mktemp("api") / "tiny-cloc-llava")
    return ChatEngine.load(folder, device="cpu")


@pytest.fixture(scope="module")
def port(engine):
    with serving(engine) as port:
        yield port


@pytest.fixture()
def client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)


def user_with_image(text: str, url: str = DATA_URI) -> dict:
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
    }


def post(port: int, body: object, raw: bytes | None = None, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = raw if raw is not None else json.dumps(body).encode()
    connection.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    status, payload = response.status, json.loads(response.read())
    connection.close()
    return status, payload


def test_openai_client_chat_matches_the_engine(client, engine):
    assert [m.id for m in client.models.list()] == ["tiny-cloc-llava"]
    assert client.models.retrieve("tiny-cloc-llava").id == "tiny-cloc-llava"
    messages = [
        user_with_image("What is [region0]?"),
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": [{"type": "text", "text": "And [region1]?"}]},
    ]
    response = client.chat.completions.create(
        model="tiny-cloc-llava", messages=messages, max_tokens=8, temperature=0, extra_body={"regions": REGIONS}
    )
    image = Image.open(io.BytesIO(PNG)).convert("RGB")
    first = engine.make_turn("What is [region0]?", REGIONS, "A red circle.")
    expected = engine.chat(image, [first], "And [region1]?", REGIONS, SamplingSettings(max_new_tokens=8))
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason in ("stop", "length") and response.model == "tiny-cloc-llava"
    assert response.usage.prompt_tokens > 16 and 0 < response.usage.completion_tokens <= 8
    assert isinstance(response.model_extra["grounded_boxes"], list)


def test_openai_client_streams_the_same_answer(client):
    kwargs = {"model": "m", "messages": [user_with_image("Describe the image.")], "max_tokens": 10}
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and "grounded_boxes" in finals[0].model_extra
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 10


def test_raw_stream_is_server_sent_events_ending_with_done(port):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {"messages": [{"role": "user", "content": "hello"}], "stream": True, "max_tokens": 4}
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body))
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    events = [line for line in response.read().decode().split("\n\n") if line]
    assert all(event.startswith("data: ") for event in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_health_and_routes(port):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/health")
    response = connection.getresponse()
    assert response.status == 200 and json.loads(response.read()) == {"status": "ok", "model": "tiny-cloc-llava"}
    routes = [("GET", "/nope", 404), ("GET", "/v1/chat/completions", 405), ("GET", "/v1/models/x", 404)]
    for method, path, status in routes:
        connection.request(method, path)
        response = connection.getresponse()
        assert response.status == status and json.loads(response.read())["error"]["message"]
    assert post(port, {}, path="/health")[0] == 405


HUGE_PNG = "data:image/png;base64," + base64.b64encode(png_bytes((5000, 4000), mode="1", colour=0)).decode()
BAD_REQUESTS = [
    ("bad JSON", None, b'{"messages": [', "not valid JSON"),
    ("not an object", [1, 2], None, "must be a JSON object"),
    ("no messages", {"messages": []}, None, "non-empty list"),
    ("no user message", {"messages": [{"role": "system", "content": "hi"}]}, None, "no user message"),
    ("ends with assistant", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     None, "start and end with a user message"),
    ("unknown role", {"messages": [{"role": "tool", "content": "a"}]}, None, "role 'tool' is not supported"),
    ("two images", {"messages": [user_with_image("a"), {"role": "assistant", "content": "b"}, user_with_image("c")]},
     None, "one image per conversation"),
    ("undecodable image", {"messages": [user_with_image("a", "data:image/png;base64,anVuaw==")]}, None,
     "could not decode"),
    ("bad base64", {"messages": [user_with_image("a", "data:image/png;base64,@@@")]}, None, "not valid base64"),
    ("huge image", {"messages": [user_with_image("a", HUGE_PNG)]}, None, "20000000 pixels; at most"),
    ("server file", {"messages": [user_with_image("a", "/etc/hostname")]}, None, "--allow-local-files"),
    ("file URL", {"messages": [user_with_image("a", "file:///etc/hostname")]}, None, "--allow-local-files"),
    ("remote URL", {"messages": [user_with_image("a", "https://example.com/a.png")]}, None, "--allow-remote-urls"),
    ("unknown region", {"messages": [user_with_image("What is [region3]?")], "regions": REGIONS}, None,
     r"\[region3\] refers to an unknown region"),
    ("region in history", {"messages": [user_with_image("[region5]"), {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}]}, None, "unknown region"),
    ("bad region", {"messages": [user_with_image("[region0]")], "regions": [[0.5, 0.5, 0.5, 0.9]]}, None, "zero area"),
    ("pixel region", {"messages": [user_with_image("[region0]")], "regions": [[0, 0, 300, 400]]}, None,
     r'regions\[0\]: box \[0, 0, 300, 400\] is not inside the image.*"box_format": "pixels"'),
    ("region partly out", {"messages": [user_with_image("[region0]")], "regions": [[0.5, 0.5, 1.2, 0.9]]}, None,
     r"regions\[0\]: box \[0.5, 0.5, 1.2, 0.9\] is not inside the image"),
    ("pixels outside", {"messages": [user_with_image("[region0]")], "regions": [[0, 0, 300, 400]],
     "box_format": "pixels"}, None, r"regions\[0\]: pixel box \[0, 0, 300, 400\] is not inside the 64x48 image"),
    ("pixels no image", {"messages": [{"role": "user", "content": "[region0]"}], "regions": [[0, 0, 3, 4]],
     "box_format": "pixels"}, None, "needs an image"),
    ("bad box_format", {"messages": [user_with_image("a")], "box_format": "xywh"}, None, "box_format 'xywh'"),
    ("regions not a list", {"messages": [user_with_image("a")], "regions": "x"}, None, "'regions' must be a list"),
    ("region without image", {"messages": [{"role": "user", "content": "[region0]"}], "regions": REGIONS}, None,
     "regions need an image"),
    ("bad temperature", {"messages": [{"role": "user", "content": "a"}], "temperature": "hot"}, None, "number"),
    ("temperature range", {"messages": [{"role": "user", "content": "a"}], "temperature": 9}, None, r"\[0, 2\]"),
    ("n > 1", {"messages": [{"role": "user", "content": "a"}], "n": 2}, None, "n=1"),
    ("max_tokens 0", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 0}, None, "max_new_tokens"),
    ("max_tokens text", {"messages": [{"role": "user", "content": "a"}], "max_tokens": "9"}, None, "integer"),
    ("image token", {"messages": [{"role": "user", "content": "<image> hi"}]}, None, "may not contain <image>"),
    ("audio part", {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, None, "not supported"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "body", "raw", "match"), BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_gets_a_400_with_a_message(port, name, body, raw, match):
    status, payload = post(port, body, raw)
    assert status == 400, payload
    assert payload["error"]["type"] == "invalid_request_error"
    assert re.search(match, payload["error"]["message"]), payload


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends on ``sock`` until it closes the connection (it closes after every response)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_size_limits_answer_413_and_411(port):
    status, payload = post(port, None, raw=b" " * (MAX_REQUEST_BYTES + 1))
    assert status == 413 and str(MAX_REQUEST_BYTES) in payload["error"]["message"]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        reply = _read_until_closed(sock).decode()  # headers and body may come in separate segments
    assert reply.startswith("HTTP/1.1 411") and "Content-Length header is required" in reply


def test_openai_client_sees_bad_requests_as_errors(client):
    with pytest.raises(openai.BadRequestError, match="unknown region"):
        client.chat.completions.create(model="m", messages=[user_with_image("[region1]")], extra_body={"regions": []})


def test_pixel_regions_with_box_format_give_the_normalised_answer(port):
    question = [user_with_image("What is [region0]? And [region1]?")]
    pixels = [[6.4, 4.8, 32, 24], [32, 12, 64, 48]]  # REGIONS in pixels of the 64x48 image
    normalised = post(port, {"messages": question, "regions": REGIONS, "max_tokens": 6})
    in_pixels = post(port, {"messages": question, "regions": pixels, "box_format": "pixels", "max_tokens": 6})
    assert normalised[0] == in_pixels[0] == 200, in_pixels
    assert in_pixels[1]["choices"][0]["message"] == normalised[1]["choices"][0]["message"]


def test_local_files_only_under_the_root_and_urls_only_when_enabled(engine, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    image = root / "img.png"
    image.write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    with serving(engine, ImagePolicy(local_files_root=root)) as port:
        for url in (str(image), image.as_uri(), "img.png"):
            status, payload = post(port, {"messages": [user_with_image("What is it?", url)], "max_tokens": 2})
            assert status == 200, payload
        answers = {}
        for name in ("gone.png", str(tmp_path / "secret.png"), str(tmp_path / "gone.png"), "../secret.png"):
            status, payload = post(port, {"messages": [user_with_image("a", name)]})
            assert status == 400
            answers[name] = payload["error"]["message"].replace(name, "NAME")
        assert set(answers.values()) == {"image_url: no image file 'NAME' under the server's image folder"}
    files = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(root)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{files.server_address[1]}/img.png"
    try:
        with serving(engine, ImagePolicy(allow_remote_urls=True)) as port:  # loopback is not public
            status, payload = post(port, {"messages": [user_with_image("What is it?", url)]})
            assert status == 400 and "127.0.0.1 is a loopback address" in payload["error"]["message"]
        policy = ImagePolicy(allow_remote_urls=True, allowed_networks=("127.0.0.1/32",))
        with serving(engine, policy) as port:
            status, payload = post(port, {"messages": [user_with_image("What is it?", url)], "max_tokens": 2})
            assert status == 200, payload
            status, payload = post(port, {"messages": [user_with_image("a", str(image))]})
            assert status == 400 and "--allow-local-files ROOT" in payload["error"]["message"]
    finally:
        files.shutdown()
        files.server_close()


def test_command_line_serves_on_loopback_and_reports_setup_errors(engine, tmp_path, capsys):
    folder = engine.model.name_or_path
    command = [sys.executable, "-m", "serve.api", "--model", str(folder), "--port", "0", "--model-name", "tiny"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"serving tiny on http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, line
        connection = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=30)
        connection.request("GET", "/health")
        assert json.loads(connection.getresponse().read()) == {"status": "ok", "model": "tiny"}
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert api_main(["--model", str(tmp_path / "nowhere")]) == 2
    assert "no CLOC-LLaVA model at" in capsys.readouterr().err
