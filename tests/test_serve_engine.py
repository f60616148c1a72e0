"""The shared chat engine: regions in, grounded boxes out, image bounds, prompts equal to training's, streaming."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest
from PIL import Image

from mllm.box_codec import get_box_codec
from serve import DEFAULT_MODEL
from serve.boxes import BOX_COLOUR, REGION_COLOUR, GroundedBox, grounded_boxes
from serve.engine import ChatEngine, InputError, SamplingSettings, Turn, parse_region_spec
from tests.tiny_serving import png_bytes, save_tiny_chat_model
from train.checkpoint import TRAINER_STATE
from train.mllm.conversations import ConversationRecord

REPO = Path(__file__).resolve().parents[1]
CODEC = get_box_codec("int999")
IMAGE = Image.new("RGB", (64, 48), (200, 30, 30))


@pytest.fixture(scope="module")
def model_folder(chat_tokenizer, tmp_path_factory):
    return save_tiny_chat_model(chat_tokenizer, tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def engine(model_folder):
    return ChatEngine.load(model_folder, device="cpu")


# ----- regions -------------------------------------------------------------------------------------------------------


def test_expand_regions_writes_region_text_and_keeps_exact_boxes_in_order(engine):
    regions = [(0.1, 0.2, 0.3, 0.4), (0.5, 0.25, 0.75, 1.0)]
    text, boxes = engine.expand_regions("  Is [region1] left of [Region 0]? ", regions)
    region = engine.processor.format_region
    assert text == f"Is {region(regions[1])} left of {region(regions[0])}?"
    assert boxes == [regions[1], regions[0]]
    with pytest.raises(InputError, match=r"region0: box \[-0.2, 0.5, 0.4, 1.3\] is not inside the image"):
        engine.expand_regions("[region0]", [(-0.2, 0.5, 0.4, 1.3)])  # partly outside: refused, never clipped
    assert engine.expand_regions("[region0]", [(0.0, 0.5, 0.4, 1.0 + 1e-9)])[1] == [(0.0, 0.5, 0.4, 1.0)]  # rounding
    assert engine.expand_regions("[region0]", [(0.4, 0.9, 0.1, 0.2)])[1] == [(0.1, 0.2, 0.4, 0.9)]  # corners ordered
    kept, kept_boxes = engine.expand_regions("What is [100, 200, 300, 400] <region>?")
    assert kept == "What is [100, 200, 300, 400] <region>?"
    assert kept_boxes == [tuple(v / 999 for v in (100, 200, 300, 400))]


@pytest.mark.parametrize(
    ("message", "regions", "match"),
    [
        ("What is [region2]?", [(0.1, 0.1, 0.2, 0.2)], r"\[region2\] refers to an unknown region.*region0\.\.region0"),
        ("What is [region0]?", [], "unknown region; regions given: none"),
        ("[region0]", [(0.2, 0.2, 0.2, 0.6)], "zero area"),
        ("[region0]", [(1.2, 1.3, 1.5, 1.9)], "not inside the image"),
        ("[region0]", [(0.1, 0.2, 0.3)], "4 finite numbers"),
        ("[region0]", [(0.1, float("nan"), 0.3, 0.4)], "finite"),
        ("What is <region>?", [], "must follow its box"),
        ("<image>\nWhat is this?", [], "may not contain <image>"),
        ("   ", [], "empty"),
    ],
)
def test_bad_regions_and_messages_raise_input_errors(engine, message, regions, match):
    with pytest.raises(InputError, match=match):
        engine.expand_regions(message, regions)


def test_region_specs_are_pixels_unless_every_value_is_at_most_one():
    size = (200, 100)
    assert parse_region_spec("[10, 20, 100, 80]", size) == pytest.approx((0.05, 0.2, 0.5, 0.8))
    assert parse_region_spec("10 20 100 80", size) == pytest.approx((0.05, 0.2, 0.5, 0.8))
    assert parse_region_spec("[0.1, 0.2, 0.5, 0.75]", size) == (0.1, 0.2, 0.5, 0.75)
    assert parse_region_spec("[0, 0, 1, 1]", size) == (0.0, 0.0, 1.0, 1.0)  # all <= 1: normalised
    assert parse_region_spec([0, 0, 200, 100], size) == (0.0, 0.0, 1.0, 1.0)
    for bad, match in [
        ("[1, 2, 3]", "expected 4 numbers"),
        ("[a, b, c, d]", "expected 4 numbers"),
        ("[300, 200, 400, 300]", r"pixel box \[300, 200, 400, 300\] is not inside the 200x100 image"),
        ([150, 50, 400, 300], r"pixel box \[150, 50, 400, 300\] is not inside"),  # partly outside: refused
        ("[0.5, 0.5, 0.5, 1]", "zero area"),
    ]:
        with pytest.raises(InputError, match=match):
            parse_region_spec(bad, size)


def test_grounded_boxes_take_the_phrase_before_each_box():
    answer = "There is a red circle [100, 200, 300, 400] and the blue square at [500, 0, 999, 999]. Also [1, 2, 3]."
    found = grounded_boxes(answer, CODEC)
    assert [g.phrase for g in found] == ["a red circle", "the blue square"]
    assert found[0].box == pytest.approx((100 / 999, 200 / 999, 300 / 999, 400 / 999))
    only_box = GroundedBox("", (250 / 999, 593 / 999, 500 / 999, 843 / 999))
    assert grounded_boxes("[250, 593, 500, 843]", CODEC) == [only_box]
    assert grounded_boxes("dogs [0, 0, 10, 10], cats [5, 5, 20, 20]", CODEC)[1].phrase == "cats"
    assert grounded_boxes("no boxes here [1e999, 0, 1, 1]", CODEC) == []
    assert grounded_boxes(None, CODEC) == []  # type: ignore[arg-type]
    assert found[0].pixels((999, 999)) == pytest.approx((100, 200, 300, 400))


# ----- images --------------------------------------------------------------------------------------------------------


def test_open_image_checks_and_converts(engine, tmp_path):
    image = engine.open_image(png_bytes(mode="RGBA", colour=(1, 2, 3, 4)))
    assert image.mode == "RGB" and image.size == (64, 48)
    assert engine.open_image(Image.new("L", (5, 7))).mode == "RGB"
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes())
    assert engine.open_image(path).size == engine.open_image(str(path)).size == (64, 48)
    huge = png_bytes(size=(5000, 4000), mode="1", colour=0)  # 20 MP, a small file
    cases = [
        (b"", "empty"),
        (b"not an image at all", "could not decode"),
        (png_bytes()[:60], "corrupt or truncated|could not decode"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "could not decode"),
        (huge, "5000x4000 = 20000000 pixels; at most 16000000"),
        (tmp_path / "missing.png", "no such image file"),
    ]
    for source, match in cases:
        with pytest.raises(InputError, match=match):
            engine.open_image(source)
    small = ChatEngine(engine.model, engine.processor, max_image_pixels=100, max_image_bytes=10_000)
    with pytest.raises(InputError, match="at most 100"):
        small.open_image(Image.new("RGB", (11, 10)))
    with pytest.raises(InputError, match="at most 10000 are accepted"):
        small.open_image(b"x" * 10_001)


def test_draw_marks_boxes_and_regions_on_a_copy(engine):
    image = Image.new("RGB", (100, 100), (255, 255, 255))
    drawn = engine.draw(image, [GroundedBox("", (0.5, 0.5, 0.9, 0.9))], regions=[(0.0, 0.4, 0.3, 0.9)])
    assert drawn.size == image.size and image.getpixel((50, 70)) == (255, 255, 255)
    assert drawn.getpixel((50, 70)) == BOX_COLOUR  # left edge of the grounded box
    assert drawn.getpixel((0, 70)) == REGION_COLOUR  # left edge of the region


# ----- prompts -------------------------------------------------------------------------------------------------------


def test_history_renders_exactly_as_training_does(engine):
    box = (0.125, 0.25, 0.5, 0.75)
    first = engine.make_turn("What is [region0]?", [box], "A red circle.")
    assert first.user == f"What is {engine.processor.format_region(box)}?" and first.boxes == (box,)
    record = ConversationRecord(
        id="x",
        turns=[
            ("user", f"<image>\n{first.user}"),
            ("assistant", "A red circle."),
            ("user", "Where is the blue square?"),
            ("assistant", "[1, 2, 3, 4]"),
        ],
        image="x.png",
        boxes=[list(box)],
    )
    training = engine.processor.apply_chat_template(record.messages()[:3], add_generation_prompt=True)
    prompt, boxes = engine.prompt([first], "Where is the blue square?")
    assert prompt == training and boxes == [box]
    assert engine.prompt([(first.user, "A red circle.")], "Where is the blue square?")[0] == training  # 2-tuples
    assert engine.prompt([tuple(first)], "Where is the blue square?") == (training, [box])  # plain 3-tuples
    with_system = engine.prompt([first], "Where is the blue square?", system="Be brief.")[0]
    assert with_system.startswith("Be brief. USER: <image>\n")
    with pytest.raises(InputError, match="regions need an image"):
        engine.prompt([first], "and now?", with_image=False)
    with pytest.raises(InputError, match="assistant's text may not contain <image>"):
        engine.prompt([Turn("hi", (), "<image>")], "and now?")


def test_sampling_settings_are_validated():
    assert SamplingSettings().generate_kwargs() == {"do_sample": False}
    assert SamplingSettings(0.7, 0.9, 5).generate_kwargs() == {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
    bad_settings = [{"temperature": -1}, {"temperature": 3}, {"top_p": 0}, {"max_new_tokens": 0}]
    bad_settings += [{"max_new_tokens": 10**6}, {"max_new_tokens": True}]
    for bad in bad_settings:
        with pytest.raises(InputError):
            SamplingSettings(**bad)


# ----- generation ----------------------------------------------------------------------------------------------------


def test_stream_grows_and_chat_returns_the_same_answer(engine):
    first = engine.make_turn("What is [region0]?", [(0.1, 0.1, 0.5, 0.5)], "A red circle.")
    settings = SamplingSettings(max_new_tokens=12)
    texts = list(engine.stream(IMAGE, [first], "And [region0]?", [(0.5, 0.5, 1.0, 1.0)], settings))
    assert texts and all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    answer = engine.chat(IMAGE, [first], "And [region0]?", [(0.5, 0.5, 1.0, 1.0)], settings)
    assert answer == texts[-1].strip()
    generation = engine.prepare(IMAGE, [], "Describe the image.", settings=SamplingSettings(max_new_tokens=3))
    assert list(generation) and generation.completion_tokens <= 3 and generation.prompt_tokens > 16
    assert generation.finish_reason in ("stop", "length")
    with pytest.raises(RuntimeError, match="read once"):
        list(generation)
    assert engine.chat(None, [], "hello", settings=SamplingSettings(max_new_tokens=3)) is not None  # text only


def test_closing_a_stream_frees_the_model_and_requests_queue(engine):
    stream = engine.stream(IMAGE, [], "Describe the image.", settings=SamplingSettings(max_new_tokens=400))
    next(stream)
    assert engine.busy
    stream.close()
    assert not engine.busy
    settings = SamplingSettings(max_new_tokens=8)
    expected = engine.chat(IMAGE, [], "Describe the image.", settings=settings)
    answers: list[str] = []

    def ask() -> None:
        answers.append(engine.chat(IMAGE, [], "Describe the image.", settings=settings))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert answers == [expected] * 3


def test_load_resolves_a_training_run_and_explains_a_missing_model(model_folder, tmp_path):
    run = tmp_path / "run"
    step = run / "step-000005"
    step.mkdir(parents=True)
    for file in model_folder.iterdir():
        (step / file.name).write_bytes(file.read_bytes())
    (step / TRAINER_STATE).write_text("{}")
    (run / "latest").write_text("step-000005\n")
    loaded = ChatEngine.load(run, device="cpu", dtype="float32")
    assert loaded.name == "run" and loaded.grounded_boxes("x [0, 0, 999, 999]")[0].box == (0.0, 0.0, 1.0, 1.0)
    with pytest.raises(FileNotFoundError, match=r"no CLOC-LLaVA model at .*nowhere.*save_pretrained"):
        ChatEngine.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dtype="):
        ChatEngine.load(run, dtype="int8")
    if (REPO / DEFAULT_MODEL).exists():
        pytest.skip("the default model exists on this machine")
    with pytest.raises(FileNotFoundError, match=r"runs/mllm_tiny_stage2.*bash scripts/quickstart\.sh"):
        ChatEngine.load()
