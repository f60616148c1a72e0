"""The demo in a real browser: Playwright drives Debian's Chromium (headless) against the page on 127.0.0.1.

It uploads a corrupt file (a message, not a traceback), then an image, drags a box on it, sends a message that
uses ``[region0]`` and checks that the answer streams in and that the answer's box and the region are drawn.
Chromium comes from ``apt-get install chromium`` (``.ci/run`` installs it); Playwright's own browser download is
never used. ``CLOC_DEMO_SCREENSHOT=/tmp/demo_scripted.png`` saves the final page for a look (its answers are
scripted, so it is not the README's screenshot: ``scripts/demo_screenshot.py`` makes that one with a real model).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from cloc_encoder.distributed import free_port
from scripts.demo_screenshot import CHROMIUM_FLAGS, drag_box, find_chromium
from serve.boxes import BOX_COLOUR, REGION_COLOUR
from serve.demo import EXAMPLES_DIR, build_demo, launch
from tests.scripted_engine import scripted_engine

EXAMPLE = EXAMPLES_DIR / "syn-test-000003.png"  # a large blue circle and a small red square
CIRCLE = (0.109375, 0.390625, 0.5, 0.78125)
SQUARE = (0.75, 0.328125, 0.90625, 0.484375)
TIMEOUT_MS = 60_000
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # pandas deprecations inside Gradio


def chromium_path() -> str:
    """Debian's Chromium (or $CHROMIUM); fails, never skips, when it is missing."""
    found = find_chromium()
    if found is None:
        pytest.fail("the demo's browser test needs Chromium: `apt-get install -y chromium` (.ci/run installs it)")
    return found


def colour_pixels(data_url: str, colour: tuple[int, int, int]) -> int:
    image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")
    return int(np.all(np.asarray(image) == np.array(colour), axis=-1).sum())


@pytest.fixture()
def demo_url(chat_tokenizer):
    engine = scripted_engine(chat_tokenizer, delay=0.05)
    answer = f"The large blue circle {engine.processor.format_box(CIRCLE)} is left of the red square."
    engine.model.script = chat_tokenizer.encode(answer, add_special_tokens=False)
    port = free_port()
    demo = launch(build_demo(engine), "127.0.0.1", port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/", answer
    finally:
        demo.close()


def test_demo_in_chromium(demo_url, tmp_path):
    url, answer = demo_url
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            upload = page.locator("#upload input[type=file]")
            upload.set_input_files(str(corrupt))
            expect(page.locator("#status")).to_contain_text("could not decode", timeout=TIMEOUT_MS)

            page.locator("#upload button[aria-label='Clear']").first.click()
            upload.set_input_files(str(EXAMPLE))
            image = page.locator("#canvas img.cloc-image")
            image.wait_for()
            plain = image.get_attribute("src")

            # Drag a box over the red square.
            drag_box(page, image, SQUARE)
            expect(page.locator("#regions")).to_contain_text("[region0]")
            page.wait_for_function(
                "(plain) => document.querySelector('#canvas img.cloc-image').src !== plain", arg=plain
            )
            assert colour_pixels(image.get_attribute("src"), REGION_COLOUR) > 100

            # Send a message using [region0]; record the chat's text at every change to see the answer stream in.
            page.evaluate(
                """() => { window.seen = []; const chat = document.querySelector('#chatbot');
                new MutationObserver(() => window.seen.push(chat.innerText))
                  .observe(chat, {childList: true, subtree: true, characterData: true}); }"""
            )
            page.locator("#message textarea").fill("What is left of [region0]?")
            page.locator("#send").click()
            page.wait_for_function(
                "(answer) => document.querySelector('#chatbot').innerText.includes(answer)", arg=answer
            )
            expect(page.locator("#answer-boxes")).to_contain_text("The large blue circle")
            seen = page.evaluate("window.seen")
            partial = [text for text in seen if "The large" in text and answer not in text]
            assert len(partial) >= 2, f"the answer did not stream: {seen[-3:]}"
            src = image.get_attribute("src")
            assert colour_pixels(src, BOX_COLOUR) > 100 and colour_pixels(src, REGION_COLOUR) > 100

            page.locator("#message textarea").fill("   ")
            page.locator("#send").click()
            expect(page.locator("#status")).to_contain_text("type a message")
            page.locator("#status").evaluate("node => node.innerHTML = ''")  # keep the screenshot tidy
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("CLOC_DEMO_SCREENSHOT"):
                shutil.copyfile(shot, Path(os.environ["CLOC_DEMO_SCREENSHOT"]))
        finally:
            browser.close()
