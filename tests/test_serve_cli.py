"""The terminal chat: piped input, typed boxes become regions, commands, drawing, and clear setup errors."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from serve.cli import TerminalChat, main, typed_regions
from serve.engine import ChatEngine, InputError, SamplingSettings
from tests.tiny_serving import png_bytes, save_tiny_chat_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_folder(chat_tokenizer, tmp_path_factory):
    return save_tiny_chat_model(chat_tokenizer, tmp_path_factory.mktemp("cli") / "model")


def test_typed_boxes_become_regions_in_pixels_or_normalised():
    text, boxes = typed_regions("Is [10, 20, 100, 60] left of [0.5, 0.5, 1, 1]?", (200, 80))
    assert text == "Is [region0] left of [region1]?"
    assert boxes == [pytest.approx((0.05, 0.25, 0.5, 0.75)), (0.5, 0.5, 1.0, 1.0)]
    kept, none = typed_regions("What is [100, 200, 300, 400] <region>?", (200, 80))
    assert kept == "What is [100, 200, 300, 400] <region>?" and none == []
    with pytest.raises(InputError, match=r"pixel box \[300, 100, 400, 200\] is not inside the 200x80 image"):
        typed_regions("and [300, 100, 400, 200]?", (200, 80))
    with pytest.raises(InputError, match="not inside the 200x80 image"):  # partly outside: refused, not clipped
        typed_regions("and [100, 40, 300, 60]?", (200, 80))


def test_piped_session_streams_lists_regions_and_draws(model_folder, tmp_path):
    image, drawn = tmp_path / "img.png", tmp_path / "out.png"
    image.write_bytes(png_bytes((64, 48)))
    lines = [
        "What is [8, 8, 40, 40]?",
        "/regions",
        "",
        "And [0.5, 0.5, 1, 1]?",
        "[90, 90, 99, 99]",
        "/reset",
        "/regions",
    ]
    command = [sys.executable, "-m", "serve.cli", "--model", str(model_folder), "--image", str(image)]
    result = subprocess.run(
        [*command, "--draw", str(drawn), "--max-new-tokens", "6"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert "chatting about a 64x48 image" in out and out.count("ASSISTANT: ") == 2
    assert "USER: What is [8, 8, 40, 40]?" in out  # piped input is echoed like a terminal session
    assert "region 0: [8, 8, 40, 40] px  ([0.125, 0.167, 0.625, 0.833] normalised)" in out
    assert "error: region '[90, 90, 99, 99]': pixel box [90, 90, 99, 99] is not inside the 64x48 image" in out
    assert "(conversation forgotten)" in out and "(no regions yet" in out
    assert f"(drawn to {drawn})" in out
    with Image.open(drawn) as picture:
        assert picture.size == (64, 48)


def test_history_keeps_each_turns_regions(model_folder):
    engine = ChatEngine.load(model_folder, device="cpu")
    out = io.StringIO()
    chat = TerminalChat(engine, Image.new("RGB", (100, 50)), SamplingSettings(max_new_tokens=3), out=out)
    lines = iter(["What is [10, 10, 50, 40]?", "and [0.5, 0, 1, 1]?", "/regions", "/help", "/quit", "never read"])
    assert chat.run(lambda prompt: next(lines)) == 0
    assert [turn.boxes for turn in chat.history] == [((0.1, 0.2, 0.5, 0.8),), ((0.5, 0.0, 1.0, 1.0),)]
    assert chat.history[0].user == f"What is {engine.processor.format_region((0.1, 0.2, 0.5, 0.8))}?"
    text = out.getvalue()
    assert "region 1: [50, 0, 100, 50] px" in text and "/image FILE" in text


def test_setup_errors_exit_2_with_a_message(model_folder, tmp_path, capsys):
    image = tmp_path / "img.png"
    image.write_bytes(png_bytes())
    assert main(["--model", str(tmp_path / "nowhere"), "--image", str(image)]) == 2
    assert "no CLOC-LLaVA model at" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert main(["--model", str(model_folder), "--image", str(tmp_path / "bad.png")]) == 2
    assert "could not decode the image" in capsys.readouterr().err
    assert main(["--model", str(model_folder), "--image", str(image), "--temperature", "-1"]) == 2
    assert "temperature must be in [0, 2]" in capsys.readouterr().err
