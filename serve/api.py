"""An OpenAI-compatible HTTP API for a CLOC-LLaVA model, on the standard library's HTTP server (no extra packages).

    python -m serve.api [--model runs/mllm_tiny_stage2] [--host 127.0.0.1] [--port 8000] \\
        [--allow-local-files] [--allow-remote-urls] [--max-request-bytes N]

Endpoints: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` (streaming
with ``"stream": true`` as server-sent events ending with ``data: [DONE]``). Request fields and the ``regions`` /
``grounded_boxes`` extensions: :mod:`serve.openai_format`; usage: ``docs/serving.md``. Errors are JSON in OpenAI's
shape with a message: 400 bad input, 404/405 unknown route or method, 411/413 missing or too large body, 500 a
failure of the server (logged). One generation runs at a time (the engine's lock); other requests wait.
There is no authentication: the server binds 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from serve import DEFAULT_MODEL, MAX_IMAGE_PIXELS
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
READ_TIMEOUT_S = 60
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024


class APIServer(ThreadingHTTPServer):
    """A threading HTTP server holding the engine and the request limits."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        engine: ChatEngine,
        policy: ImagePolicy | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        self.engine = engine
        self.policy = policy or ImagePolicy()
        self.max_request_bytes = max_request_bytes
        self.created = int(time.time())
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: APIServer
    protocol_version = "HTTP/1.1"
    timeout = READ_TIMEOUT_S
    server_version = "cloc-llava"

    # ----- plumbing -------------------------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s %s", self.address_string(), format % args)

    def _send_json(self, status: int, body: dict[str, Any], close: bool = False) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: APIError, close: bool = False) -> None:
        self._send_json(error.status, error.body(), close=close)

    def _guard(self, handler: Any) -> None:
        try:
            handler()
        except APIError as error:
            self._send_error(error, close=error.status in (411, 413))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            logger.exception("internal error answering %s %s", self.command, self.path)
            self._send_error(APIError(500, "internal server error (see the server's log)"), close=True)

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
            if size <= DRAIN_LIMIT_BYTES:  # read it away, so the client sees the answer rather than a reset
                for start in range(0, size, 1 << 16):
                    if not self.rfile.read(min(1 << 16, size - start)):
                        break
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
) -> APIServer:
    """A bound (not yet serving) :class:`APIServer`; ``port=0`` picks a free port (``server.server_address``)."""
    return APIServer((host, port), engine, policy, max_request_bytes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve.api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder or stage-2 run (default {DEFAULT_MODEL})")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--allow-local-files", action="store_true", help="accept image_url file paths on the server")
    parser.add_argument("--allow-remote-urls", action="store_true", help="fetch http(s) image_url URLs")
    parser.add_argument(
        "--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, help="request body limit (default 20 MiB)"
    )
    parser.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, help="image width × height limit")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="model dtype")
    parser.add_argument("--model-name", default=None, help="the model id the API reports (default: the folder name)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_request_bytes < 1 or args.max_image_pixels < 1:
        print("error: --max-request-bytes and --max-image-pixels must be positive", file=sys.stderr)
        return 2
    try:
        engine = ChatEngine.load(
            args.model,
            device=args.device,
            dtype=args.dtype,
            name=args.model_name,
            max_image_pixels=args.max_image_pixels,
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    policy = ImagePolicy(allow_local_files=args.allow_local_files, allow_remote_urls=args.allow_remote_urls)
    try:
        server = make_server(engine, args.host, args.port, policy, args.max_request_bytes)
    except OSError as error:
        print(f"error: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
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
