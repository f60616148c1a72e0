"""Terminal chat with a CLOC-LLaVA model about one image.

    python -m serve.cli [--model runs/mllm_tiny_stage2] --image FILE [--draw OUT.png] [--temperature 0]
        [--top-p 1] [--max-new-tokens 128]
    python -m serve.cli --server http://HOST:8000/v1 [--server-kind serve-api|vllm] [--server-model NAME] ...

With ``--server`` the model runs behind an OpenAI-compatible server (``serve.api``, or vLLM with the project's
plugin) instead of in this process (:class:`serve.backends.RemoteBackend`); everything else is the same.

Lines are read from standard input (so a file or a pipe works too). A box the user types in a message,
``[x1, y1, x2, y2]``, becomes a region the model sees (``[x1, y1, x2, y2] <region>``): in pixels of the image, or
normalised when every value is at most 1 (:func:`serve.boxes.parse_region_spec`); a box reaching outside the image
is refused, not clipped. The answer streams to standard
output; the boxes it grounds are then listed in pixels and, with ``--draw``, drawn into a file (with this turn's
regions). Commands: ``/help``, ``/reset``, ``/regions``, ``/image FILE``, ``/quit``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from PIL import Image

from mllm.box_codec import BOX_PATTERN
from serve import DEFAULT_MODEL, MAX_IMAGE_PIXELS, one_line
from serve.backends import ChatBackend, add_backend_arguments, remote_backend
from serve.boxes import Box, to_pixels
from serve.engine import ChatEngine, InputError, SamplingSettings, Turn, parse_region_spec

HELP = """commands:
  /help          this help
  /reset         forget the conversation (keep the image)
  /regions       list the regions of the conversation so far
  /image FILE    chat about another image (forgets the conversation)
  /quit          leave (so does end of input)
a box typed in a message, [x1, y1, x2, y2], becomes a region: pixels, or normalised when every value is <= 1"""


def typed_regions(message: str, image_size: tuple[int, int], region_token: str = "<region>") -> tuple[str, list[Box]]:
    """Turn every box typed in ``message`` into a region reference ``[regionK]`` and return the normalised boxes.

    A box already followed by ``region_token`` is left as it is (the model's own box text). Raises
    :class:`~serve.InputError` for a box that lies outside the image or has zero area.
    """
    boxes: list[Box] = []
    pattern = re.compile(rf"{BOX_PATTERN.pattern}(?!\s*{re.escape(region_token)})")

    def replace(match: re.Match[str]) -> str:
        boxes.append(parse_region_spec(match.group(0), image_size))
        return f"[region{len(boxes) - 1}]"

    return pattern.sub(replace, message), boxes


def _format_box(box: Box, image_size: tuple[int, int]) -> str:
    pixels = ", ".join(str(round(v)) for v in to_pixels(box, image_size))
    normalised = ", ".join(f"{v:.3f}" for v in box)
    return f"[{pixels}] px  ([{normalised}] normalised)"


class TerminalChat:
    """The read–answer loop; ``read`` returns one line or raises ``EOFError`` at the end of input."""

    def __init__(
        self,
        engine: ChatBackend,
        image: Image.Image,
        settings: SamplingSettings,
        draw_path: Path | None = None,
        system: str | None = None,
        out: TextIO = sys.stdout,
    ) -> None:
        self.engine, self.image, self.settings = engine, image, settings
        self.draw_path, self.system, self.out = draw_path, system, out
        self.history: list[Turn] = []

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def run(self, read: Callable[[str], str] = input) -> int:
        """Chat until ``/quit`` or the end of input; returns the exit status (0)."""
        self.say(f"chatting about a {self.image.width}x{self.image.height} image; /help lists commands")
        while True:
            try:
                line = read("USER: ").strip()
            except (EOFError, KeyboardInterrupt):
                self.say()
                return 0
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            self.answer(line)

    def command(self, line: str) -> bool:
        """Run a ``/command``; ``False`` means quit."""
        name, _, argument = line.partition(" ")
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/reset":
            self.history.clear()
            self.say("(conversation forgotten)")
        elif name == "/regions":
            boxes = [box for turn in self.history for box in turn.boxes]
            for index, box in enumerate(boxes):
                self.say(f"  region {index}: {_format_box(box, self.image.size)}")
            if not boxes:
                self.say("  (no regions yet; type a box [x1, y1, x2, y2] in a message)")
        elif name == "/image" and argument.strip():
            try:
                self.image = self.engine.open_image(argument.strip())
            except InputError as error:
                self.say(f"error: {error}")
                return True
            self.history.clear()
            self.say(f"(new {self.image.width}x{self.image.height} image; conversation forgotten)")
        else:
            self.say(HELP)
        return True

    def answer(self, line: str) -> None:
        """Answer one message: stream the reply, list grounded boxes, draw them when asked."""
        try:
            message, regions = typed_regions(line, self.image.size, self.engine.region_token)
            turn = self.engine.make_turn(message, regions, "")
            generation = self.engine.prepare(self.image, self.history, message, regions, self.settings, self.system)
        except InputError as error:
            self.say(f"error: {error}")
            return
        self.say("ASSISTANT: ", end="")
        texts = iter(generation)
        shown = ""
        try:
            for text in texts:
                self.say(text[len(shown) :], end="")
                shown = text
        except KeyboardInterrupt:
            texts.close()
            self.say(" [interrupted]")
            return
        except InputError as error:  # a remote server failing during the answer
            self.say(f" [error: {error}]")
            return
        self.say()
        self.history.append(turn._replace(assistant=generation.text))
        boxes = self.engine.grounded_boxes(generation.text)
        for index, grounded in enumerate(boxes):
            phrase = f"  {grounded.phrase!r}" if grounded.phrase else ""
            self.say(f"  box {index + 1}: {_format_box(grounded.box, self.image.size)}{phrase}")
        if self.draw_path is not None:
            try:
                self.engine.draw(self.image, boxes, turn.boxes).save(self.draw_path)
                self.say(f"  (drawn to {self.draw_path})")
            except (OSError, ValueError) as error:
                self.say(f"error: could not write {self.draw_path}: {error}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve.cli", description="Chat with a CLOC-LLaVA model.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder or stage-2 run (default {DEFAULT_MODEL})")
    parser.add_argument("--image", required=True, type=Path, help="the image to chat about")
    parser.add_argument("--draw", type=Path, default=None, help="after each answer, draw its boxes into this file")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy decoding")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (default 128)")
    parser.add_argument("--system", default=None, help="system prompt (default: the chat template's)")
    parser.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, help="image width × height limit")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="model dtype")
    add_backend_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = SamplingSettings(args.temperature, args.top_p, args.max_new_tokens)
        engine: ChatBackend
        if args.server:
            engine = remote_backend(args, max_image_pixels=args.max_image_pixels)
        else:
            engine = ChatEngine.load(args.model, args.device, args.dtype, max_image_pixels=args.max_image_pixels)
        image = engine.open_image(args.image)
    except (OSError, ValueError) as error:  # InputError and ModelLoadError are ValueErrors
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty()
    chat = TerminalChat(engine, image, settings, args.draw, args.system)
    return chat.run(input if interactive else _read_piped)


def _read_piped(prompt: str) -> str:
    """``input`` for a pipe: echo the prompt and the line, so a transcript reads like a terminal session."""
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    sys.stdout.write(prompt + line if line.endswith("\n") else f"{prompt}{line}\n")
    return line.rstrip("\n")


if __name__ == "__main__":
    raise SystemExit(main())
