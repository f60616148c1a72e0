"""The Gradio demo's logic without a browser: canvas events → regions, uploads, streaming answers with boxes drawn,
regenerate / undo / clear, and every refused input as a message (tests/test_demo_browser.py drives the page)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from serve import InputError
from serve.boxes import BOX_COLOUR, REGION_COLOUR
from serve.demo import EXAMPLES_DIR, DemoHandlers, DemoState, build_demo, main, parse_args
from serve.demo_canvas import POINT_BOX_SIDE, region_from_event
from tests.scripted_engine import scripted_engine, set_script

EXAMPLE = EXAMPLES_DIR / "syn-test-000003.png"  # a large blue circle and a small red square
CIRCLE = (0.109375, 0.390625, 0.5, 0.78125)
SQUARE = (0.75, 0.328125, 0.90625, 0.484375)


@pytest.fixture()
def engine(chat_tokenizer):
    return scripted_engine(chat_tokenizer)


def decode(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")


def colour_pixels(image: Image.Image, colour: tuple[int, int, int]) -> int:
    return int(np.all(np.asarray(image) == np.array(colour), axis=-1).sum())


def test_canvas_events_become_normalised_boxes():
    assert region_from_event({"box": [0.6, 0.5, 0.2, 0.1], "kind": "box"}) == (0.2, 0.1, 0.6, 0.5)
    assert region_from_event({"box": [0.0, 0.0, 1.01, 1.0], "kind": "box"}) == (0.0, 0.0, 1.0, 1.0)  # border
    x1, y1, x2, y2 = region_from_event({"box": [0.5, 0.5, 0.5, 0.5], "kind": "point"})
    assert (x2 - x1, y2 - y1) == pytest.approx((POINT_BOX_SIDE, POINT_BOX_SIDE))
    assert region_from_event({"box": [0.0, 1.0, 0.0, 1.0], "kind": "point"})[:2] == (0.0, 1.0 - POINT_BOX_SIDE / 2)
    for bad in ({"box": [1.5, 0.2, 1.9, 0.4]}, {"box": [0.1, 0.2, 0.3]}, {"box": ["a", 0, 1, 1]}, {}, None):
        with pytest.raises(InputError):
            region_from_event(bad)
    with pytest.raises(InputError, match="zero area"):
        region_from_event({"box": [0.2, 0.2, 0.6, 0.2], "kind": "box"})


def test_bad_uploads_give_a_message_and_keep_the_current_image(engine, tmp_path):
    handlers = DemoHandlers(engine)
    state, canvas, _, _, _, status = handlers.upload(str(EXAMPLE), DemoState())
    assert state.image is not None and state.image.size == (64, 64) and status == ""
    assert decode(canvas).size == (640, 640)  # enlarged for drawing; boxes are normalised, so unchanged
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    kept, _, _, _, _, status = handlers.upload(str(corrupt), state)
    assert kept is state and "could not decode" in status
    engine.max_image_pixels = 64 * 64 - 1  # a 'huge' image for this engine
    _, _, _, _, _, status = handlers.upload(str(EXAMPLE), state)
    assert "at most 4095" in status
    _, canvas, regions, chat, _, status = handlers.upload(None, DemoState())
    assert canvas == "" and "No regions yet" in regions and chat == [] and status == ""


def test_regions_are_listed_drawn_undone_and_checked(engine):
    handlers = DemoHandlers(engine)
    _, _, _, status = handlers.add_region(DemoState(), {"box": [0.1, 0.1, 0.5, 0.5]})
    assert "upload an image" in status
    state = handlers.upload(str(EXAMPLE), DemoState())[0]
    state, canvas, regions, status = handlers.add_region(state, {"box": list(SQUARE), "kind": "box"})
    assert status == "" and "`[region0]` `[0.750, 0.328, 0.906, 0.484]`" in regions
    assert colour_pixels(decode(canvas), REGION_COLOUR) > 100
    state, _, regions, status = handlers.add_region(state, {"box": [2.0, 2.0, 3.0, 3.0], "kind": "box"})
    assert "outside the image" in status and "[region1]" not in regions
    state, canvas, regions, status = handlers.undo_region(state)
    assert state.regions == [] and colour_pixels(decode(canvas), REGION_COLOUR) == 0
    assert "no region to undo" in handlers.undo_region(state)[3]


def test_answers_stream_and_their_boxes_are_drawn(engine, chat_tokenizer):
    handlers = DemoHandlers(engine)
    answer = f"The large blue circle {engine.processor.format_box(CIRCLE)} is left of it."
    set_script(engine.model, chat_tokenizer, answer)
    state = handlers.upload(str(EXAMPLE), DemoState())[0]
    state = handlers.add_region(state, {"box": list(SQUARE), "kind": "box"})[0]
    steps = list(handlers.respond("What is left of [region0]?", state, 0.0, 1.0, 64))
    chats = [step[1] for step in steps]
    assert chats[0][-1] == {"role": "assistant", "content": ""} and steps[0][3] == ""  # message box cleared
    partial = [chat[-1]["content"] for chat in chats[1:-1]]
    assert len(partial) > 3 and all(answer.startswith(text) for text in partial)  # streamed, growing
    state, chat, canvas, _, boxes_text, status = steps[-1]
    assert chat == [
        {"role": "user", "content": "What is left of [region0]?"},
        {"role": "assistant", "content": answer},
    ]
    assert status == "" and "**The large blue circle**" in boxes_text
    assert [b.phrase for b in state.answer_boxes] == ["The large blue circle"]
    assert state.answer_boxes[0].box == pytest.approx(CIRCLE, abs=1 / 999)
    drawn = decode(canvas)
    assert colour_pixels(drawn, BOX_COLOUR) > 100 and colour_pixels(drawn, REGION_COLOUR) > 100
    x1, y1, _, y2 = state.answer_boxes[0].pixels(drawn.size)
    assert drawn.getpixel((round(x1) + 1, round((y1 + y2) / 2))) == BOX_COLOUR  # the box's left edge

    # Multi-turn: the first turn (with its region) is in the prompt of the second.
    set_script(engine.model, chat_tokenizer, "Yes.")
    prompt, boxes = engine.prompt(state.turns, "Is it [region0]?", state.regions)
    assert prompt.count("<region>") == 2 and boxes == [SQUARE, SQUARE]
    state = list(handlers.respond("Is it [region0]?", state, 0.7, 0.9, 8))[-1][0]
    assert [turn[2] for turn in state.turns] == [answer, "Yes."] and state.answer_boxes == []

    # Regenerate replaces the last answer; clear forgets turns and regions but keeps the image.
    set_script(engine.model, chat_tokenizer, "No.")
    state, chat, *_ = list(handlers.regenerate(state, 0.0, 1.0, 8))[-1]
    assert [turn[2] for turn in state.turns] == [answer, "No."] and chat[-1]["content"] == "No."
    state, _, _, chat, boxes_text, _ = handlers.clear(state)
    assert state.turns == [] and state.regions == [] and chat == [] and boxes_text == "" and state.image is not None
    assert "no answer to regenerate" in list(handlers.regenerate(state, 0.0, 1.0, 8))[-1][-1]


def test_refused_messages_keep_the_text_and_say_why(engine):
    handlers = DemoHandlers(engine)
    (step,) = handlers.respond("What is this?", DemoState(), 0.0, 1.0, 8)
    assert "upload an image first" in step[-1] and step[3] == "What is this?"
    state = handlers.upload(str(EXAMPLE), DemoState())[0]
    (step,) = handlers.respond("   ", state, 0.0, 1.0, 8)
    assert "type a message" in step[-1]
    (step,) = handlers.respond("What is [region2]?", state, 0.0, 1.0, 8)
    assert "unknown region" in step[-1] and step[3] == "What is [region2]?" and state.turns == []
    (step,) = handlers.respond("Hi", state, 0.0, 1.0, 0)
    assert "max_new_tokens" in step[-1]


def test_the_page_builds_and_the_command_line_defaults_are_safe(engine, tmp_path, capsys):
    demo = build_demo(engine, concurrency=2)
    config = demo.get_config_file()
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert {"canvas", "upload", "message", "chatbot", "regions", "undo", "clear", "regenerate"} <= ids
    args = parse_args([])
    assert args.host == "127.0.0.1" and args.model == "runs/mllm_tiny_stage2" and not args.share
    assert parse_args(["--host", "0.0.0.0", "--share"]).share
    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "no CLOC-LLaVA model" in capsys.readouterr().err
