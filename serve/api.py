"""An OpenAI-compatible HTTP API for a CLOC-LLaVA model, on the standard library's HTTP server (no extra packages).

    python -m serve.api [--model runs/mllm_tiny_stage2] [--host 127.0.0.1] [--port 8000] \\
        [--allow-local-files ROOT] [--allow-remote-urls] [--allow-url-network CIDR] [--max-request-bytes N] \\
        [--workers 4] [--max-queue 32]

Endpoints: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` (streaming
with ``"stream": true`` as server-sent events ending with ``data: [DONE]``). Request fields and the ``regions`` /
``grounded_boxes`` extensions: :mod:`serve.openai_format`; usage: ``docs/serving.md``. Errors are JSON in OpenAI's
shape with a message: 400 bad input, 404/405 unknown route or method, 411/413 missing or too large body, 500 a
failure of the server (logged), 503 (with ``Retry-After``) when the queue is full. One generation runs at a time
(the engine's lock); other requests wait.

Load: the accepting thread hands each connection to a fixed pool of ``--workers`` threads through a queue of at
most ``--max-queue`` connections. A connection that finds the queue full is answered 503 at once, before anything of
its request is read; one background thread then reads away (without keeping) what the client still sends, so the
client reads the 503 instead of a reset, and closes it. Every response closes its connection, so an idle client
never holds a worker. There is no authentication: the server binds 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import queue
import selectors
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from serve import DEFAULT_MODEL, MAX_IMAGE_PIXELS, one_line
from serve.engine import ChatEngine, Generation, InputError
from serve.openai_format import (
    APIError,
    ChatRequest,
    ImagePolicy,
    boxes_json,
    chunk,
    completion,
    completion_id,
    parse_chat_request,
    usage,
)

logger = logging.getLogger("serve.api")

DEFAULT_MAX_REQUEST_BYTES = 20 * 1024 * 1024
DEFAULT_WORKERS = 4
DEFAULT_MAX_QUEUE = 32
MIN_LISTEN_BACKLOG = 128
HEAD_TIMEOUT_S = 10
"""Seconds a connection may stay silent before its request line and headers are in (then ``READ_TIMEOUT_S``)."""
READ_TIMEOUT_S = 60
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
DRAIN_TIME_S = 10.0
MAX_DRAINING = 256
RETRY_AFTER_S = 1
_POLL_S = 0.05


class _Drainer:
    """One thread that reads away what clients still send on connections the server has already answered (a 503
    from the accepting thread, a 413 from a worker) and then closes them: closing a socket with unread input makes
    the kernel send a reset, which can destroy the answer before the client reads it.

    A connection is closed at the client's end of input, after ``limit_bytes`` or after ``time_s`` seconds; beyond
    ``MAX_DRAINING`` connections at once, new ones are closed at once."""

    def __init__(self, limit_bytes: int = DRAIN_LIMIT_BYTES, time_s: float = DRAIN_TIME_S) -> None:
        self.limit_bytes, self.time_s = limit_bytes, time_s
        self._incoming: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        self._count = 0
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cloc-llava-drain", daemon=True)
        self._thread.start()

    def add(self, connection: socket.socket) -> None:
        """Take over ``connection`` (its answer already written): half-close it, read it away, close it."""
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_WR)
        with self._count_lock:
            full = self._count >= MAX_DRAINING or self._stop.is_set()
            self._count += 0 if full else 1
        if full:
            connection.close()
        else:
            self._incoming.put(connection)

    def close(self) -> None:
        """Stop the thread and close what it still holds."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _release(self, selector: selectors.BaseSelector, connection: socket.socket) -> None:
        selector.unregister(connection)
        connection.close()
        with self._count_lock:
            self._count -= 1

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        budget: dict[socket.socket, tuple[float, int]] = {}  # deadline, bytes left
        while not self._stop.is_set():
            while not self._incoming.empty():
                connection = self._incoming.get()
                connection.setblocking(False)
                selector.register(connection, selectors.EVENT_READ)
                budget[connection] = (time.monotonic() + self.time_s, self.limit_bytes)
            for key, _ in selector.select(timeout=_POLL_S) if budget else []:
                connection = key.fileobj  # type: ignore[assignment]
                deadline, left = budget[connection]
                try:
                    data = connection.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                budget[connection] = (deadline, left - len(data))
                if not data or left - len(data) <= 0:
                    del budget[connection]
                    self._release(selector, connection)
            if not budget:
                self._stop.wait(_POLL_S)
            now = time.monotonic()
            for connection in [c for c, (deadline, _) in budget.items() if deadline <= now]:
                del budget[connection]
                self._release(selector, connection)
        for connection in list(budget):
            self._release(selector, connection)
        selector.close()


def _busy_response(workers: int, max_queue: int) -> bytes:
    """A complete HTTP 503 answer in OpenAI's error shape, with ``Retry-After``."""
    message = (
        f"the server is busy: its {workers} workers and {max_queue} queue places are taken; "
        f"retry after {RETRY_AFTER_S} s"
    )
    body = json.dumps(APIError(503, message, code="server_busy").body()).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER_S}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class APIServer(HTTPServer):
    """An HTTP server holding the engine and the request limits, answering with a bounded pool of threads.

    ``workers`` threads handle connections; at most ``max_queue`` more wait for one; a connection beyond that is
    answered 503 with ``Retry-After`` by the accepting thread without reading its request (see the module
    docstring). The listen backlog fits the workers and the queue (at least ``MIN_LISTEN_BACKLOG``).
    """

    def __init__(
        self,
        address: tuple[str, int],
        engine: ChatEngine,
        policy: ImagePolicy | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        workers: int = DEFAULT_WORKERS,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> None:
        if workers < 1 or max_queue < 0:
            raise ValueError(f"workers must be at least 1 and max_queue at least 0, got {workers} and {max_queue}")
        self.engine = engine
        self.policy = policy or ImagePolicy()
        self.max_request_bytes = max_request_bytes
        self.created = int(time.time())
        self.request_queue_size = max(MIN_LISTEN_BACKLOG, workers + max_queue)
        self.capacity = workers + max_queue
        self._busy = _busy_response(workers, max_queue)
        self._admitted = 0  # connections queued or being answered
        self._admitted_lock = threading.Lock()
        self._pending: queue.SimpleQueue[tuple[socket.socket, Any] | None] = queue.SimpleQueue()
        self._drainer = _Drainer()
        self._workers = [
            threading.Thread(target=self._work, name=f"cloc-llava-api-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._workers:
            thread.start()
        super().__init__(address, _Handler)  # on a bind error it calls server_close, which stops the threads

    def process_request(self, request: Any, client_address: Any) -> None:
        """Queue the connection for a worker, or answer 503 now when the workers and the queue are full."""
        with self._admitted_lock:
            admitted = self._admitted < self.capacity
            self._admitted += 1 if admitted else 0
        if admitted:
            self._pending.put((request, client_address))
        else:
            self._refuse(request)

    def _refuse(self, connection: socket.socket) -> None:
        logger.warning("busy: answered 503 to a connection")
        try:
            connection.settimeout(1.0)
            connection.sendall(self._busy)
        except OSError:
            connection.close()
            return
        self._drainer.add(connection)

    def _work(self) -> None:
        while (item := self._pending.get()) is not None:
            connection, client_address = item
            handler: _Handler | None = None
            try:
                handler = _Handler(connection, client_address, self)
            except Exception:  # noqa: BLE001 - logged; a worker must outlive any one connection
                self.handle_error(connection, client_address)
            finally:
                if handler is not None and handler.drain_input:
                    self._drainer.add(connection)
                else:
                    self.shutdown_request(connection)
                with self._admitted_lock:
                    self._admitted -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.exception("error while answering %s", client_address)

    def server_close(self) -> None:
        """Close the listening socket, finish the workers (after the connections they hold) and the drainer."""
        super().server_close()
        with contextlib.suppress(queue.Empty):
            while (item := self._pending.get_nowait()) is not None:
                self.shutdown_request(item[0])
        for _ in self._workers:
            self._pending.put(None)
        for thread in self._workers:
            thread.join(timeout=READ_TIMEOUT_S)
        self._drainer.close()


class _Handler(BaseHTTPRequestHandler):
    """One connection, one request: every answer closes the connection (``Connection: close``)."""

    server: APIServer
    protocol_version = "HTTP/1.1"
    timeout = HEAD_TIMEOUT_S
    server_version = "cloc-llava"
    drain_input = False
    """Set when the answer went out before the request body was read (413): the server then reads it away."""

    # ----- plumbing -------------------------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s %s", self.address_string(), format % args)

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: APIError) -> None:
        self._send_json(error.status, error.body())

    def _guard(self, handler: Any) -> None:
        try:
            handler()
        except APIError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            logger.exception("internal error answering %s %s", self.command, self.path)
            self._send_error(APIError(500, "internal server error (see the server's log)"))

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None:
            raise APIError(411, "a Content-Length header is required (chunked uploads are not accepted)")
        try:
            size = int(length)
        except ValueError as error:
            raise APIError(400, f"bad Content-Length {length!r}") from error
        if size < 0:
            raise APIError(400, f"bad Content-Length {length!r}")
        if size > self.server.max_request_bytes:
            self.drain_input = True  # answered unread; the server's drainer reads it away (no reset)
            limit = self.server.max_request_bytes
            raise APIError(413, f"the request is {size} bytes; this server accepts at most {limit}")
        raw = self.rfile.read(size)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise APIError(400, f"the request body is not valid JSON: {error}") from error

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.server.engine.name, "object": "model", "created": self.server.created, "owned_by": "local"}

    # ----- routes ---------------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._guard(self._get)

    def do_POST(self) -> None:
        self.connection.settimeout(READ_TIMEOUT_S)  # the head is in; the body may take longer
        self._guard(self._post)

    def _get(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            self._send_json(200, {"status": "ok", "model": self.server.engine.name})
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [self._model_card()]})
        elif path == f"/v1/models/{self.server.engine.name}":
            self._send_json(200, self._model_card())
        elif path.startswith("/v1/models/"):
            raise APIError(404, f"no model {path.rsplit('/', 1)[-1]!r}; this server has {self.server.engine.name!r}")
        elif path == "/v1/chat/completions":
            raise APIError(405, "use POST for /v1/chat/completions")
        else:
            raise APIError(404, f"no route GET {path}")

    def _post(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != "/v1/chat/completions":
            if path in ("/health", "/v1/models"):
                raise APIError(405, f"use GET for {path}")
            raise APIError(404, f"no route POST {path}")
        body = self._read_json()
        engine = self.server.engine
        request = parse_chat_request(body, engine, self.server.policy)
        try:
            generation = engine.prepare(
                request.image, request.history, request.message, request.regions, request.settings, request.system
            )
        except InputError as error:
            raise APIError(400, str(error)) from error
        if request.stream:
            self._stream(request, generation)
            return
        for _ in generation:
            pass
        boxes = boxes_json(engine.grounded_boxes(generation.text), request.image)
        used = usage(generation.prompt_tokens, generation.completion_tokens)
        reason = generation.finish_reason or "stop"
        body = completion(completion_id(), engine.name, generation.text, reason, used, boxes)
        self._send_json(200, body)

    def _event(self, data: dict[str, Any] | str) -> None:
        text = data if isinstance(data, str) else json.dumps(data)
        self.wfile.write(f"data: {text}\n\n".encode())
        self.wfile.flush()

    def _stream(self, request: ChatRequest, generation: Generation) -> None:
        """Server-sent events: role chunk, content deltas, a final chunk (finish reason, ``grounded_boxes``),
        optionally a usage chunk, then ``[DONE]``. The connection closes after the stream."""
        engine, cid = self.server.engine, completion_id()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        self._event(chunk(cid, engine.name, {"role": "assistant", "content": ""}))
        texts = iter(generation)
        shown = ""
        try:
            for text in texts:
                self._event(chunk(cid, engine.name, {"content": text[len(shown) :]}))
                shown = text
        except (BrokenPipeError, ConnectionResetError):
            texts.close()  # the client went away: stop generating
            raise
        except Exception:
            texts.close()
            logger.exception("generation failed while streaming")
            self._event(APIError(500, "generation failed (see the server's log)").body())
            self._event("[DONE]")
            return
        boxes = boxes_json(engine.grounded_boxes(generation.text), request.image)
        self._event(chunk(cid, engine.name, {}, generation.finish_reason or "stop", grounded_boxes=boxes))
        if request.include_usage:
            final = chunk(cid, engine.name, {}, usage=usage(generation.prompt_tokens, generation.completion_tokens))
            final["choices"] = []
            self._event(final)
        self._event("[DONE]")


def make_server(
    engine: ChatEngine,
    host: str = "127.0.0.1",
    port: int = 8000,
    policy: ImagePolicy | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    workers: int = DEFAULT_WORKERS,
    max_queue: int = DEFAULT_MAX_QUEUE,
) -> APIServer:
    """A bound (not yet serving) :class:`APIServer`; ``port=0`` picks a free port (``server.server_address``)."""
    return APIServer((host, port), engine, policy, max_request_bytes, workers, max_queue)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve.api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder or stage-2 run (default {DEFAULT_MODEL})")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument(
        "--allow-local-files",
        metavar="ROOT",
        default=None,
        help="accept image_url file paths (and file:// URLs), read only from under the folder ROOT",
    )
    parser.add_argument(
        "--allow-remote-urls", action="store_true", help="fetch http(s) image_url URLs (public addresses only)"
    )
    parser.add_argument(
        "--allow-url-network",
        metavar="CIDR",
        action="append",
        default=[],
        help="with --allow-remote-urls, also fetch from this non-public address range (repeatable; e.g. 10.1.0.0/16)",
    )
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="threads answering requests (default 4)")
    parser.add_argument(
        "--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="connections waiting for a worker before 503s (32)"
    )
    parser.add_argument(
        "--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, help="request body limit (default 20 MiB)"
    )
    parser.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, help="image width × height limit")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="model dtype")
    parser.add_argument("--model-name", default=None, help="the model id the API reports (default: the folder name)")
    return parser


def _setup(args: argparse.Namespace) -> tuple[ChatEngine, ImagePolicy]:
    """The engine and the image policy from the command line; ``ValueError``/``OSError`` with a message."""
    if args.max_request_bytes < 1 or args.max_image_pixels < 1:
        raise ValueError("--max-request-bytes and --max-image-pixels must be positive")
    if args.workers < 1 or args.max_queue < 0:
        raise ValueError("--workers must be at least 1 and --max-queue at least 0")
    policy = ImagePolicy(
        local_files_root=args.allow_local_files,
        allow_remote_urls=args.allow_remote_urls,
        allowed_networks=tuple(args.allow_url_network),
    )
    engine = ChatEngine.load(
        args.model, device=args.device, dtype=args.dtype, name=args.model_name, max_image_pixels=args.max_image_pixels
    )
    return engine, policy


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted; setup errors print one line ``error: ...`` and return 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine, policy = _setup(args)
    except (OSError, ValueError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    try:
        server = make_server(engine, args.host, args.port, policy, args.max_request_bytes, args.workers, args.max_queue)
    except OSError as error:
        print(f"error: cannot listen on {args.host}:{args.port}: {one_line(error)}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: anyone who can reach it can use the model (there is no authentication)", host)
    print(f"serving {engine.name} on http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
