"""The Gradio demo: upload an image, draw regions, chat about them, see the answer's boxes drawn on the image.

``python -m serve.demo [--model PATH] [--host H] [--port N] [--share]``; with ``--server URL`` (and
``--server-kind serve-api|vllm``) the model runs behind an OpenAI-compatible server instead of in this process
(:mod:`serve.backends`). The model defaults to
``runs/mllm_tiny_stage2`` (what ``bash scripts/quickstart.sh`` trains). The server binds ``127.0.0.1`` unless
``--host`` says otherwise; ``--share`` adds a public gradio.live link. Answers stream through a queue whose
generation slots are limited (``--concurrency``, default 1: the engine generates one answer at a time anyway).

On the image (:mod:`serve.demo_canvas`) a drag draws a box and a click a point (a small box); each region is listed
as ``[region0]``, ``[region1]``, ... and a message refers to it by that name; the engine writes it for the model
as ``[x1, y1, x2, y2] <region>`` (DESIGN.md: normalised ``xyxy`` of the original image, the model's box codec).
:func:`build_demo` builds the page around any :class:`~serve.backends.ChatBackend` (tests pass a tiny engine).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from serve import DEFAULT_MODEL, MAX_IMAGE_BYTES, InputError, one_line
from serve.backends import ChatBackend, add_backend_arguments, remote_backend
from serve.boxes import Box, GroundedBox
from serve.demo_canvas import CANVAS_CSS, CANVAS_JS, CANVAS_TEMPLATE, display_copy, region_from_event, to_data_url
from serve.engine import ChatEngine, SamplingSettings

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
MAX_REGIONS = 16
HOW_TO = (
    "**Upload an image** (or pick an example). **Drag** on the image to draw a box, **click** for a point; each "
    "region is listed as `[region0]`, `[region1]`, ... Use those names in your message, e.g. "
    "*What is [region0]?* or *Where is the red circle?* Boxes in the answer are drawn in red with their phrases, "
    "your regions in blue."
)


@dataclass
class DemoState:
    """One browser session: the image (original), its display copy, the regions drawn and the conversation.

    ``turns`` holds ``(message, regions, answer)``: the message as typed (``[regionK]`` names) with the regions
    that existed when it was sent, which is also the history format :class:`~serve.engine.ChatEngine` reads.
    """

    image: Image.Image | None = None
    display: Image.Image | None = None
    regions: list[Box] = field(default_factory=list)
    turns: list[tuple[str, tuple[Box, ...], str]] = field(default_factory=list)
    answer_boxes: list[GroundedBox] = field(default_factory=list)


def _warn(message: str) -> str:
    return f"⚠️ {message}"


class DemoHandlers:
    """The demo's event handlers, as plain methods (each returns the new values of its outputs) so that they can
    be tested without a browser."""

    def __init__(self, engine: ChatBackend) -> None:
        self.engine = engine

    # ----- views --------------------------------------------------------------------------------------------------

    def canvas(self, state: DemoState) -> str:
        """The canvas value: the display copy with regions and answer boxes drawn, as a data URL (``""``: none)."""
        if state.display is None:
            return ""
        return to_data_url(self.engine.draw(state.display, state.answer_boxes, state.regions))

    @staticmethod
    def regions_text(state: DemoState) -> str:
        if not state.regions:
            return "No regions yet: drag a box on the image, or click for a point."
        rows = [f"- `[region{k}]` `[{', '.join(f'{v:.3f}' for v in box)}]`" for k, box in enumerate(state.regions)]
        return "Regions (x1, y1, x2, y2 as fractions of the image):\n" + "\n".join(rows)

    @staticmethod
    def boxes_text(state: DemoState) -> str:
        if not state.answer_boxes:
            return ""
        rows = [
            f"{k + 1}. **{grounded.phrase or 'box'}** `[{', '.join(f'{v:.3f}' for v in grounded.box)}]`"
            for k, grounded in enumerate(state.answer_boxes)
        ]
        return "Boxes in the answer:\n" + "\n".join(rows)

    @staticmethod
    def chat_messages(state: DemoState, pending: tuple[str, str] | None = None) -> list[dict[str, str]]:
        pairs = [(message, answer) for message, _, answer in state.turns]
        if pending is not None:
            pairs.append(pending)
        messages: list[dict[str, str]] = []
        for message, answer in pairs:
            messages.append({"role": "user", "content": message})
            messages.append({"role": "assistant", "content": answer})
        return messages

    # ----- image and regions --------------------------------------------------------------------------------------

    def upload(self, path: str | None, state: DemoState) -> tuple[DemoState, str, str, list[dict[str, str]], str, str]:
        """A new image (a file path from the upload box) starts a new conversation; a bad one leaves all as is."""
        status = ""
        if path:
            try:
                image = self.engine.open_image(path)
            except InputError as error:
                status = _warn(f"That file was not used: {error}")
            else:
                state = DemoState(image=image, display=display_copy(image))
        outputs = (self.canvas(state), self.regions_text(state), self.chat_messages(state), self.boxes_text(state))
        return (state, *outputs, status)

    def add_region(self, state: DemoState, data: dict[str, Any]) -> tuple[DemoState, str, str, str]:
        """A drawn box or clicked point (a canvas event's data) becomes the next region."""
        try:
            if state.image is None:
                raise InputError("upload an image before drawing regions")
            if len(state.regions) >= MAX_REGIONS:
                raise InputError(f"at most {MAX_REGIONS} regions; undo one first")
            state.regions.append(region_from_event(data))
        except InputError as error:
            return state, self.canvas(state), self.regions_text(state), _warn(str(error))
        return state, self.canvas(state), self.regions_text(state), ""

    def undo_region(self, state: DemoState) -> tuple[DemoState, str, str, str]:
        if not state.regions:
            return state, self.canvas(state), self.regions_text(state), _warn("there is no region to undo")
        state.regions.pop()
        return state, self.canvas(state), self.regions_text(state), ""

    def clear(self, state: DemoState) -> tuple[DemoState, str, str, list[dict[str, str]], str, str]:
        """Forget the conversation and the regions; keep the image."""
        state = DemoState(image=state.image, display=state.display)
        outputs = (self.canvas(state), self.regions_text(state), self.chat_messages(state), self.boxes_text(state))
        return (state, *outputs, "")

    # ----- chat ---------------------------------------------------------------------------------------------------

    def respond(
        self, message: str, state: DemoState, temperature: float, top_p: float, max_new_tokens: float
    ) -> Iterator[tuple[DemoState, list[dict[str, str]], str, str, str, str]]:
        """Answer ``message`` about the image, streaming. Yields (state, chat, canvas, message box, answer boxes,
        status); an invalid input yields one status message and keeps the message in its box."""
        yield from self._answer(state, message or "", tuple(state.regions), temperature, top_p, max_new_tokens)

    def regenerate(
        self, state: DemoState, temperature: float, top_p: float, max_new_tokens: float
    ) -> Iterator[tuple[DemoState, list[dict[str, str]], str, str, str, str]]:
        """Answer the last message again (with the regions it was sent with)."""
        if not state.turns:
            yield self._outputs(state, "", status=_warn("there is no answer to regenerate yet"))
            return
        message, regions, _ = state.turns.pop()
        yield from self._answer(state, message, regions, temperature, top_p, max_new_tokens, keep="")

    def _answer(
        self,
        state: DemoState,
        message: str,
        regions: tuple[Box, ...],
        temperature: float,
        top_p: float,
        max_new_tokens: float,
        keep: str | None = None,
    ) -> Iterator[tuple[DemoState, list[dict[str, str]], str, str, str, str]]:
        keep = message if keep is None else keep  # what the message box shows when the input is refused
        try:
            if state.image is None:
                raise InputError("upload an image first")
            if not message.strip():
                raise InputError("type a message first")
            settings = SamplingSettings(float(temperature), float(top_p), int(max_new_tokens))
            generation = self.engine.prepare(state.image, state.turns, message.strip(), regions, settings)
        except InputError as error:
            yield self._outputs(state, keep, status=_warn(str(error)))
            return
        message = message.strip()
        state.answer_boxes = []
        canvas = self.canvas(state)
        yield self._outputs(state, "", pending=(message, ""), canvas=canvas)
        answer = ""
        try:
            for answer in generation:
                boxes = self.engine.grounded_boxes(answer)
                if boxes != state.answer_boxes:
                    state.answer_boxes = boxes
                    canvas = self.canvas(state)
                yield self._outputs(state, "", pending=(message, answer), canvas=canvas)
        except InputError as error:  # a remote server failing during the answer: the turn is not kept
            state.answer_boxes = []
            yield self._outputs(state, message, status=_warn(str(error)))
            return
        answer = generation.text or answer
        state.turns.append((message, regions, answer))
        state.answer_boxes = self.engine.grounded_boxes(answer)
        yield self._outputs(state, "")

    def _outputs(
        self,
        state: DemoState,
        message_box: str,
        pending: tuple[str, str] | None = None,
        canvas: str | None = None,
        status: str = "",
    ) -> tuple[DemoState, list[dict[str, str]], str, str, str, str]:
        canvas = self.canvas(state) if canvas is None else canvas
        return state, self.chat_messages(state, pending), canvas, message_box, self.boxes_text(state), status


def build_demo(engine: ChatBackend, title: str = "CLOC-LLaVA", concurrency: int = 1) -> gr.Blocks:
    """The demo page around ``engine``; at most ``concurrency`` answers are generated at once (queue it and launch
    it, as :func:`launch` does)."""
    handlers = DemoHandlers(engine)
    examples = sorted(str(path) for path in EXAMPLES_DIR.glob("*.png"))
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}: chat about regions of an image\n{HOW_TO}\n\nModel: `{engine.name}`")
        state = gr.State(DemoState())
        with gr.Row():
            with gr.Column(scale=1):
                canvas = gr.HTML(
                    "",
                    html_template=CANVAS_TEMPLATE,
                    css_template=CANVAS_CSS,
                    js_on_load=CANVAS_JS,
                    elem_id="canvas",
                )
                with gr.Row():
                    undo = gr.Button("Undo region", elem_id="undo", size="sm")
                    clear = gr.Button("Clear chat and regions", elem_id="clear", size="sm")
                regions = gr.Markdown(DemoHandlers.regions_text(DemoState()), elem_id="regions")
                upload = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="upload")
                if examples:
                    gr.Examples([[path] for path in examples], inputs=[upload], label="Examples (synthetic world)")
            with gr.Column(scale=1):
                chatbot = gr.Chatbot(
                    label="Chat", elem_id="chatbot", height=420, render_markdown=False, feedback_options=None
                )
                message = gr.Textbox(
                    label="Message", placeholder="What is [region0]?", elem_id="message", lines=1, max_lines=4
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                status = gr.Markdown("", elem_id="status")
                answer_boxes = gr.Markdown("", elem_id="answer-boxes")
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                    max_tokens = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens")

        image_outputs = [state, canvas, regions, chatbot, answer_boxes, status]
        region_outputs = [state, canvas, regions, status]
        chat_outputs = [state, chatbot, canvas, message, answer_boxes, status]
        sampling = [temperature, top_p, max_tokens]
        upload.change(handlers.upload, [upload, state], image_outputs, concurrency_limit=None)

        def on_region(current: DemoState, evt: gr.EventData) -> tuple[DemoState, str, str, str]:
            return handlers.add_region(current, evt._data)

        canvas.region(on_region, [state], region_outputs, concurrency_limit=None)  # the canvas's "region" event
        undo.click(handlers.undo_region, [state], region_outputs, concurrency_limit=None)
        clear.click(handlers.clear, [state], image_outputs, concurrency_limit=None)
        generate = {"concurrency_limit": concurrency, "concurrency_id": "generate"}
        message.submit(handlers.respond, [message, state, *sampling], chat_outputs, **generate)
        send.click(handlers.respond, [message, state, *sampling], chat_outputs, **generate)
        regenerate.click(handlers.regenerate, [state, *sampling], chat_outputs, **generate)
    return demo


def launch(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    max_queue: int = 16,
    block: bool = True,
) -> gr.Blocks:
    """Queue (at most ``max_queue`` waiting events) and serve ``demo``; uploads are bounded by ``MAX_IMAGE_BYTES``.
    With ``block=False`` it returns once the server runs (call ``demo.close()`` to stop it)."""
    demo.queue(max_size=max_queue)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=MAX_IMAGE_BYTES,
        show_error=False,
        prevent_thread_lock=not block,
        quiet=not block,
    )
    return demo


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model folder or training run (default {DEFAULT_MODEL})"
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs network)")
    parser.add_argument("--concurrency", type=int, default=1, help="answers generated at once (default 1)")
    parser.add_argument("--max-queue", type=int, default=16, help="events waiting in the queue at most")
    add_backend_arguments(parser)
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.max_queue < 1:
        parser.error("--concurrency and --max-queue must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        engine: ChatBackend
        if args.server:
            engine = remote_backend(args)
        else:
            engine = ChatEngine.load(args.model, device=args.device, dtype=args.dtype)
    except (OSError, ValueError) as error:  # a missing or broken model folder, a bad --device / --dtype
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    try:
        launch(build_demo(engine, concurrency=args.concurrency), args.host, args.port, args.share, args.max_queue)
    except OSError as error:  # e.g. the port is taken
        print(f"error: cannot serve on {args.host}:{args.port}: {one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
