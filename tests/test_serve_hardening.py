"""The HTTP API under hostile input and load: which addresses an image URL may reach (and how it is fetched), which
server files it may read, 64 concurrent clients (only 200s and 503s, no resets), and one-line setup errors."""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import shutil
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from serve import InputError
from serve.api import main as api_main
from serve.api import make_server
from serve.cli import main as cli_main
from serve.engine import ChatEngine
from serve.image_sources import fetch_url, read_local_file, refusal
from tests.tiny_serving import png_bytes, save_tiny_chat_model

PNG = png_bytes((32, 24))
LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)


@pytest.fixture(scope="module")
def model_folder(chat_tokenizer, tmp_path_factory):
    return save_tiny_chat_model(chat_tokenizer, tmp_path_factory.mktemp("hardening") / "tiny")


@pytest.fixture(scope="module")
def engine(model_folder):
    return ChatEngine.load(model_folder, device="cpu")


# ----- which addresses a URL may reach -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("172.16.5.5", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("fd00:ec2::254", "cloud metadata"),
        ("168.63.129.16", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non-public"),
        ("192.0.0.8", "non-public"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("64:ff9b::a9fe:a9fe", "cloud metadata"),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("2001:db8::1", "private"),
    ],
)
def test_non_public_addresses_are_refused(address, why):
    assert refusal(ipaddress.ip_address(address)) == f"a {why} address"


def test_public_and_allowed_addresses_are_reachable_but_metadata_never():
    assert refusal(ipaddress.ip_address("93.184.215.14")) is None
    assert refusal(ipaddress.ip_address("2606:4700::1111")) is None
    allowed = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("169.254.0.0/16"))
    assert refusal(ipaddress.ip_address("10.9.8.7"), allowed) is None
    assert refusal(ipaddress.ip_address("169.254.169.254"), allowed) == "a cloud metadata address"


# ----- how a URL is fetched ----------------------------------------------------------------------------------------


class _ImageHost(BaseHTTPRequestHandler):
    """Serves ``/img.png``, a redirect, a large body (with or without its length), and a body that trickles."""

    seen_hosts: list[str] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.seen_hosts.append(self.headers.get("Host", ""))
        if self.path == "/img.png":
            self._answer(200, PNG)
        elif self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/big":
            self._answer(200, b"x" * 5000)
        elif self.path == "/big-unsized":  # no length: the server closes after the body
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 200_000)
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
        else:
            self._answer(404, b"")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def image_host():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHost)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _to_loopback(host: str, port: int, **kwargs: object) -> list[tuple]:
    """A resolver that answers 127.0.0.1 for every name."""
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]


def test_a_name_is_resolved_once_and_the_vetted_address_is_used_with_the_names_host_header(image_host):
    calls = []

    def resolver(host, port, **kwargs):
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    _ImageHost.seen_hosts.clear()
    data = fetch_url(f"http://images.example:{image_host}/img.png", 10_000, allowed=LOOPBACK, resolver=resolver)
    assert data == PNG and calls == ["images.example"]
    assert _ImageHost.seen_hosts == [f"images.example:{image_host}"]


def test_https_to_the_vetted_address_sends_the_names_sni():
    names: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no certificate: the handshake fails after the ClientHello
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    listener = socket.create_server(("127.0.0.1", 0))

    def accept_one() -> None:
        connection, _ = listener.accept()
        with contextlib.suppress(ssl.SSLError, OSError), connection:
            context.wrap_socket(connection, server_side=True)

    thread = threading.Thread(target=accept_one, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    with listener, pytest.raises(InputError, match="could not fetch the image URL"):
        fetch_url(f"https://images.example:{port}/a.png", 1000, allowed=LOOPBACK, resolver=_to_loopback)
    thread.join(timeout=10)
    assert names == ["images.example"]


def test_names_that_resolve_inside_are_refused_before_connecting():
    def rebinding(host, port, **kwargs):  # one public and one internal answer: refused, not filtered
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in ("93.184.215.14", "10.0.0.7")]

    with pytest.raises(InputError, match=r"host 'images\.example' resolves to a private address"):
        fetch_url("http://images.example/a.png", 10_000, resolver=rebinding)
    for url, match in [
        ("http://localhost:9/a.png", "resolves to a loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata address"),
        ("http://[fd00:ec2::254]/latest/", "fd00:ec2::254 is a cloud metadata address"),
        ("http://[::ffff:7f00:1]:80/a.png", "is a loopback address"),
        ("http://user:secret@example.com/a.png", "credentials"),
    ]:
        with pytest.raises(InputError, match=match):
            fetch_url(url, 10_000)


def test_no_redirects_a_size_cap_and_one_deadline(image_host):
    base = f"http://127.0.0.1:{image_host}"
    with pytest.raises(InputError, match=r"answered 302 .*169\.254\.169\.254.*redirects are not followed"):
        fetch_url(f"{base}/moved", 10_000, allowed=LOOPBACK)
    with pytest.raises(InputError, match="5000 bytes; at most 4096"):
        fetch_url(f"{base}/big", 4096, allowed=LOOPBACK)
    with pytest.raises(InputError, match="larger than 4096 bytes"):
        fetch_url(f"{base}/big-unsized", 4096, allowed=LOOPBACK)
    start = time.monotonic()
    with pytest.raises(InputError, match="took longer than 1 s"):
        fetch_url(f"{base}/slow", 10_000, timeout_s=1.0, allowed=LOOPBACK)  # every read is quick; the total is not
    assert time.monotonic() - start < 3


# ----- which server files may be read ------------------------------------------------------------------------------


def test_local_files_resolve_symlinks_and_answer_alike_for_missing_and_outside(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "a.png").write_bytes(PNG)
    (outside / "secret.png").write_bytes(PNG)
    (root / "inner-link.png").symlink_to(root / "sub" / "a.png")
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "escape-dir").symlink_to(outside)
    os.mkfifo(root / "fifo.png")  # opening a FIFO for reading would block without O_NONBLOCK
    resolved = root.resolve()
    for spec in ("sub/a.png", str(root / "sub" / "a.png"), "inner-link.png", (root / "sub" / "a.png").as_uri()):
        assert read_local_file(spec, resolved, 10_000) == PNG
    messages = set()
    for spec in (
        "missing.png",
        str(outside / "secret.png"),
        str(outside / "missing.png"),
        "escape.png",
        "escape-dir/secret.png",
        "../outside/secret.png",
        "sub",
        "fifo.png",
        "file://otherhost/etc/hostname",
    ):
        with pytest.raises(InputError) as caught:
            read_local_file(spec, resolved, 10_000)
        messages.add(str(caught.value).replace(repr(spec), "SPEC"))
    assert messages == {"no image file SPEC under the server's image folder"}
    with pytest.raises(InputError, match="larger than 10 bytes"):
        read_local_file("sub/a.png", resolved, 10)


# ----- load --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(engine: ChatEngine, **kwargs):
    server = make_server(engine, "127.0.0.1", 0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


def _chat(port: int, start: threading.Barrier | None = None) -> tuple[int, str | None, dict]:
    body = json.dumps({"messages": [{"role": "user", "content": "Describe it."}], "max_tokens": 2})
    if start is not None:
        start.wait()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.getheader("Retry-After"), json.loads(response.read())
    finally:
        connection.close()


def test_64_concurrent_clients_get_200s_and_503s_only_and_the_server_keeps_serving(engine):
    clients = 64
    with serving(engine, workers=2, max_queue=6) as port:
        barrier = threading.Barrier(clients)
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda _: _chat(port, barrier), range(clients)))  # a reset would raise here
        statuses = [status for status, _, _ in results]
        assert set(statuses) == {200, 503} and len(statuses) == clients
        assert statuses.count(200) >= 8  # the 2 workers and the 6 queued places at least
        for status, retry_after, body in results:
            if status == 503:
                assert retry_after == "1" and body["error"]["code"] == "server_busy"
            else:
                assert body["object"] == "chat.completion"
        assert _chat(port)[0] == 200
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200


def test_a_full_server_answers_503_at_once_without_reading_a_large_body(engine):
    with serving(engine, workers=1, max_queue=0) as port:
        holder = socket.create_connection(("127.0.0.1", port))  # the one worker waits for this body
        holder.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        time.sleep(0.3)
        big = b'{"messages": "' + b"x" * (8 * 1024 * 1024) + b'"}'
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(big)}\r\n\r\n"
            sock.sendall(head.encode())
            reply = sock.recv(4096).decode()  # before any of the body is sent
            elapsed = time.monotonic() - start
            sock.sendall(big)  # the server reads it away rather than resetting the connection
            assert sock.recv(4096) == b""  # then an orderly close
        assert reply.startswith("HTTP/1.1 503") and "Retry-After: 1" in reply and "server_busy" in reply
        assert elapsed < 2
        holder.sendall(b"x" * 100)  # the held request ends (a 400: not JSON); the worker serves again
        assert holder.recv(4096).startswith(b"HTTP/1.1 400")
        holder.close()
        assert _eventually_served(port)


def _eventually_served(port: int, seconds: float = 5.0) -> bool:
    """Whether a chat request gets a 200 within ``seconds`` (a 503 may come while the worker finishes closing)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _chat(port)[0] == 200:
            return True
        time.sleep(0.05)
    return False


# ----- setup errors ------------------------------------------------------------------------------------------------


def _broken(folder: Path, tmp_path: Path, name: str) -> Path:
    broken = tmp_path / name
    shutil.copytree(folder, broken)
    return broken


def test_command_lines_exit_2_with_one_line_naming_the_file(model_folder, tmp_path, capsys):
    other_type = _broken(model_folder, tmp_path, "bert")
    (other_type / "config.json").write_text(json.dumps({"model_type": "bert"}))  # would build a 7B model
    bad_json = _broken(model_folder, tmp_path, "bad-json")
    (bad_json / "config.json").write_text("{nope")
    truncated = _broken(model_folder, tmp_path, "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    no_tokenizer = _broken(model_folder, tmp_path, "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    cases = [
        (other_type, f"{other_type / 'config.json'}: model_type is 'bert', not 'cloc_llava'"),
        (bad_json, f"{bad_json / 'config.json'}: not a readable JSON file"),
        (truncated, f"{weights}: not a complete safetensors file"),
        (no_tokenizer, f"{no_tokenizer}: cannot load the processor"),
    ]
    for folder, message in cases:
        assert api_main(["--model", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    image = tmp_path / "img.png"
    image.write_bytes(PNG)
    assert cli_main(["--model", str(other_type), "--image", str(image)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {other_type / 'config.json'}: model_type is 'bert'")
    from serve.demo import main as demo_main  # imports gradio

    assert demo_main(["--model", str(truncated)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {weights}: not a complete safetensors file")
    assert api_main(["--model", str(model_folder), "--allow-local-files", str(tmp_path / "nowhere")]) == 2
    nowhere = tmp_path / "nowhere"
    assert capsys.readouterr().err == f"error: {nowhere}: not a folder (the root for --allow-local-files)\n"
    assert api_main(["--model", str(model_folder), "--allow-url-network", "10.0.0.0/33"]) == 2
    assert "not an address range" in capsys.readouterr().err
    assert api_main(["--model", str(model_folder), "--device", "nonsense"]) == 2
    assert capsys.readouterr().err.startswith("error: device 'nonsense' is not a torch device")
