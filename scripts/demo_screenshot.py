"""Screenshot the Gradio demo answering with a real model (``docs/demo.png`` comes from here).

Starts ``serve.demo`` on 127.0.0.1 with the model folder, opens it in headless Chromium (Debian's, as the browser
test), uploads an example image, drags a box over one object, asks what ``[region0]`` is and where another object is,
waits for both answers, and saves a full-page screenshot. Prints both answers. Nothing is scripted: the text and boxes
are whatever the model writes (greedy decoding).

    python scripts/demo_screenshot.py --model runs/mllm_tiny_stage2 --out docs/demo.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from playwright.sync_api import Locator, Page, sync_playwright

from cloc_encoder.distributed import free_port
from serve.demo import EXAMPLES_DIR, build_demo, launch
from serve.engine import ChatEngine

EXAMPLE = EXAMPLES_DIR / "syn-test-000003.png"  # a large blue circle and a small red square
SQUARE = (0.75, 0.328125, 0.90625, 0.484375)  # the red square's box, normalised xyxy
QUESTIONS = ("What is [region0]?", "Where is the blue circle?")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
"""Headless Chromium in a container, without its background traffic (shared with tests/test_demo_browser.py)."""
TIMEOUT_S = 120.0


def find_chromium() -> str | None:
    """Debian's Chromium (``apt-get install chromium``), or ``$CHROMIUM``; ``None`` when there is none."""
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    return None


def drag_box(page: Page, image: Locator, box: Sequence[float]) -> None:
    """Drag the mouse over ``box`` (normalised ``xyxy`` of the displayed image) to draw a region on the canvas."""
    frame = image.bounding_box()
    x1, y1, x2, y2 = box
    page.mouse.move(frame["x"] + x1 * frame["width"], frame["y"] + y1 * frame["height"])
    page.mouse.down()
    page.mouse.move(frame["x"] + x2 * frame["width"], frame["y"] + y2 * frame["height"], steps=8)
    page.mouse.up()


def wait_for_answer(page: Page, before: str) -> str:
    """Wait until the chat has grown past ``before`` and stopped changing for a second; the new chat text."""
    deadline, last, stable_since = time.monotonic() + TIMEOUT_S, before, time.monotonic()
    while time.monotonic() < deadline:
        text = page.locator("#chatbot").inner_text()
        if text != last:
            last, stable_since = text, time.monotonic()
        elif text != before and time.monotonic() - stable_since > 1.5:
            return text[len(before) :].strip() if text.startswith(before) else text
        time.sleep(0.25)
    raise TimeoutError(f"no complete answer within {TIMEOUT_S:.0f} s")


def screenshot(model: Path, out: Path, example: Path, box: Sequence[float], questions: Sequence[str]) -> list[str]:
    """Run the demo with ``model``, ask ``questions`` about ``example`` with ``box`` drawn as ``[region0]``, save
    the page to ``out``; the answers' chat text."""
    executable = find_chromium()
    if executable is None:
        raise RuntimeError("Chromium is needed: apt-get install -y chromium (or set $CHROMIUM)")
    engine = ChatEngine.load(str(model))
    port = free_port()
    demo = launch(build_demo(engine), "127.0.0.1", port, block=False)
    answers = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_S * 1000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#upload input[type=file]").set_input_files(str(example))
            image = page.locator("#canvas img.cloc-image")
            image.wait_for()
            drag_box(page, image, box)
            page.locator("#regions").get_by_text("[region0]").first.wait_for()
            for question in questions:
                before = page.locator("#chatbot").inner_text()
                page.locator("#message textarea").fill(question)
                page.locator("#send").click()
                answers.append(wait_for_answer(page, before).removeprefix(question).strip())
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    finally:
        demo.close()
    return answers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("runs/mllm_tiny_stage2"))
    parser.add_argument("--out", type=Path, default=Path("docs/demo.png"))
    args = parser.parse_args(argv)
    for question, answer in zip(QUESTIONS, screenshot(args.model, args.out, EXAMPLE, SQUARE, QUESTIONS), strict=True):
        print(f"Q: {question}\nA: {answer}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
