"""Flickr30k Entities phrase grounding and Ferret-Bench: parsing the official formats, Recall@1 under both
protocols, resume and batch invariance with a tiny model, and the LLM judge (retries, cache, malformed replies)
against a local server."""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from cloc_encoder.data.format import read_region_text
from cloc_encoder.data.synthetic import SyntheticWorldConfig, generate_world
from eval.cli import main as eval_main
from eval.ferret_bench.task import (
    JUDGE_SYSTEM_PROMPT,
    answer_for_judge,
    ferret_question,
    ferret_scores,
    load_ferret_bench,
    load_rules,
    review_messages,
)
from eval.flickr30k.evaluate import evaluate_phrase_grounding
from eval.flickr30k.task import (
    PhraseTarget,
    flickr_phrase_questions,
    merged_box,
    parse_annotation,
    parse_sentences,
    phrase_expression,
    phrase_recall,
    region_phrase_questions,
    score_phrases,
)
from eval.judge import ChatJudge, JudgeError, JudgeSettings, parse_two_scores
from eval.mllm_generation import GenerationSettings
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
from mllm.box_codec import get_box_codec
from mllm.tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
FERRET_DATA = REPO / ".." / "shared" / "data" / "ferret_bench"
CODEC = get_box_codec("int999")
needs_ferret_data = pytest.mark.skipif(
    not (FERRET_DATA / "rule.json").is_file(),
    reason=f"Ferret-Bench files not found at {FERRET_DATA} (the shared data folder beside the clone)",
)

# ----- fixtures ------------------------------------------------------------------------------------------------------

SENTENCES = {
    "1000": [
        "[/EN#1/people A man] in [/EN#2/clothing a black hat] walks [/EN#3/animals two dogs] .",
        "[/EN#1/people The man] is outside in [/EN#4/scene the snow] with [/EN#0/notvisual someone] .",
        "[/EN#8/clothing/other His hat] is black and [/EN#6/other a ball] is hidden .",
    ],
    "2000": ["[/EN#10/people People] stand near [/EN#11/vehicles a red car] ."],
    "3000": ["[/EN#20/animals A cat] sleeps ."],
}
OBJECTS = {  # image id: (width, height, [(names, pixel box or flags)])
    "1000": (
        200,
        100,
        [
            (["1"], (20, 10, 60, 90)),
            (["2", "8"], (30, 10, 50, 30)),  # one box shared by two entities
            (["3"], (100, 50, 140, 90)),
            (["3"], (150, 50, 190, 90)),
            (["4"], {"nobndbox": 0, "scene": 1}),
            (["6"], {"nobndbox": 1, "scene": 0}),
        ],
    ),
    "2000": (100, 100, [(["10"], (0, 20, 50, 100)), (["11"], (50, 50, 100, 90))]),
    "3000": (64, 64, [(["20"], (0, 0, 32, 32))]),
}


def _annotation_xml(width: int, height: int, objects: list) -> str:
    parts = [f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for names, content in objects:
        parts.append("<object>" + "".join(f"<name>{n}</name>" for n in names))
        if isinstance(content, dict):
            parts.append("".join(f"<{k}>{v}</{k}>" for k, v in content.items()))
        else:
            x1, y1, x2, y2 = content
            parts.append(f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>")
        parts.append("</object>")
    return "\n".join([*parts, "</annotation>"])


@pytest.fixture(scope="module")
def flickr_dir(tmp_path_factory) -> Path:
    """Three images in the official Flickr30k Entities layout, written here."""
    root = tmp_path_factory.mktemp("flickr30k_entities")
    for folder in ("Sentences", "Annotations", "flickr30k-images"):
        (root / folder).mkdir()
    (root / "test.txt").write_text("1000\n2000\n")
    (root / "val.txt").write_text("3000\n")
    for image_id, (width, height, objects) in OBJECTS.items():
        (root / "Sentences" / f"{image_id}.txt").write_text("\n".join(SENTENCES[image_id]) + "\n")
        (root / "Annotations" / f"{image_id}.xml").write_text(_annotation_xml(width, height, objects))
        colour = (int(image_id) % 251, 90, 160)
        Image.new("RGB", (width, height), colour).save(root / "flickr30k-images" / f"{image_id}.jpg")
    return root


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(SyntheticWorldConfig(image_size=32), out, {"test": 3})
    return out / "test.jsonl"


class CountingModel(CLOCLlavaForConditionalGeneration):
    """The tiny model, counting the questions each ``generate`` call answers."""

    calls: list[int]

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(int(kwargs["input_ids"].shape[0]))
        return super().generate(*args, **kwargs)


@pytest.fixture()
def model_and_processor(chat_tokenizer):
    torch.manual_seed(0)
    config = tiny_config(chat_tokenizer, text_config={"initializer_range": 0.2})
    model = CountingModel._from_config(config).eval()
    model.calls = []
    return model, CLOCLlavaProcessor.from_model_config(config, chat_tokenizer)


@pytest.fixture()
def saved_model(model_and_processor, tmp_path) -> Path:
    model, processor = model_and_processor
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


# ----- Flickr30k Entities --------------------------------------------------------------------------------------------


def test_flickr_sentences_and_annotations_parse(flickr_dir):
    first, second, third = parse_sentences((flickr_dir / "Sentences" / "1000.txt").read_text())
    assert first.text == "A man in a black hat walks two dogs ."
    assert [(p.text, p.entity, p.types, p.first_word) for p in first.phrases] == [
        ("A man", "1", ("people",), 0),
        ("a black hat", "2", ("clothing",), 3),
        ("two dogs", "3", ("animals",), 7),
    ]
    assert [p.entity for p in second.phrases] == ["1", "4", "0"]
    assert third.phrases[0].types == ("clothing", "other")
    boxes = parse_annotation(flickr_dir / "Annotations" / "1000.xml")
    assert (boxes.width, boxes.height) == (200, 100)
    assert boxes.boxes["1"] == [(0.1, 0.1, 0.3, 0.9)]
    assert boxes.boxes["2"] == boxes.boxes["8"]  # a shared <object> with two names
    assert len(boxes.boxes["3"]) == 2
    assert boxes.scene == {"4"} and boxes.nobox == {"6"} and "4" not in boxes.boxes


def test_flickr_phrase_questions_skip_boxless_phrases_and_merge_boxes(flickr_dir):
    phrases = flickr_phrase_questions(flickr_dir, "test")
    assert phrases.num_images == 2
    assert phrases.skipped == {"scene": 1, "nobndbox": 1, "not_annotated": 1}
    ids = [q.id for q in phrases.questions]
    assert ids == ["1000-s0-p0", "1000-s0-p1", "1000-s0-p2", "1000-s1-p0", "1000-s2-p0", "2000-s0-p0", "2000-s0-p1"]
    texts = {q.id: q.text for q in phrases.questions}
    assert texts["1000-s0-p0"] == "Where is the man?"
    assert texts["1000-s0-p1"] == "Where is the black hat?"
    assert texts["1000-s0-p2"] == "Where is the two dogs?"
    assert texts["1000-s2-p0"] == "Where is his hat?"
    assert texts["2000-s0-p0"] == "Where is the people?"
    assert phrases.questions[0].image == flickr_dir / "flickr30k-images" / "1000.jpg"
    dogs = phrases.targets["1000-s0-p2"]
    assert dogs.types == ("animals",) and merged_box(dogs.boxes) == pytest.approx((0.5, 0.5, 0.95, 0.9))
    assert [q.id for q in flickr_phrase_questions(flickr_dir, "val").questions] == ["3000-s0-p0"]
    assert len(flickr_phrase_questions(flickr_dir, "test", limit=1).questions) == 5


def test_phrase_expression_reads_naturally():
    assert phrase_expression("A man in a hat", sentence_initial=True) == "the man in a hat"
    assert phrase_expression("an apple") == "the apple"
    assert phrase_expression("some snow") == "some snow"
    assert phrase_expression("Their dogs", sentence_initial=True) == "their dogs"
    assert phrase_expression("two dogs") == "the two dogs"
    assert phrase_expression("Asian man") == "the Asian man"  # not sentence-initial: the capital stays
    assert phrase_expression("People", sentence_initial=True) == "the people"


def test_recall_at_1_under_both_protocols_on_hand_made_predictions(flickr_dir):
    phrases = flickr_phrase_questions(flickr_dir, "test")
    targets = phrases.targets
    one_dog = targets["1000-s0-p2"].boxes[0]
    answers = {
        "1000-s0-p0": f"It is at {CODEC.encode((0.1, 0.1, 0.3, 0.9))}.",  # exact: hit under both
        "1000-s0-p1": "no idea",  # no box: miss
        "1000-s0-p2": CODEC.encode(one_dog),  # one of two dogs: any-box hit, merged miss (IoU 0.44)
        "1000-s1-p0": CODEC.encode((0.5, 0.5, 1.0, 1.0)),  # wrong place: miss
        "1000-s2-p0": CODEC.encode((0.15, 0.1, 0.25, 0.3)),  # exact shared box
        "2000-s0-p0": CODEC.encode((0.0, 0.2, 0.5, 1.0)) + " and " + CODEC.encode((0.5, 0.5, 1.0, 0.9)),
        # "2000-s0-p1": no prediction at all: miss
    }
    predictions = {i: {"id": i, "answer": a} for i, a in answers.items()}
    scores = score_phrases(predictions, targets, CODEC)
    assert scores["merged"]["recall@1"] == pytest.approx(3 / 7)
    assert scores["any"]["recall@1"] == pytest.approx(4 / 7)
    assert scores["no_box"] == 2 and scores["merged"]["num_phrases"] == 7
    assert scores["merged"]["by_type"]["animals"] == {"recall@1": 0.0, "num_phrases": 1}
    assert scores["any"]["by_type"]["animals"] == {"recall@1": 1.0, "num_phrases": 1}
    assert scores["merged"]["by_type"]["clothing"]["recall@1"] == pytest.approx(0.5)
    # The merged box itself: a merged-protocol hit, an any-box miss (IoU 0.44 with each dog).
    merged = {"d": merged_box(targets["1000-s0-p2"].boxes)}
    dogs = {"d": PhraseTarget("d", targets["1000-s0-p2"].boxes)}
    assert phrase_recall(merged, dogs, "merged")["recall@1"] == 1.0
    assert phrase_recall(merged, dogs, "any")["recall@1"] == 0.0
    corners = {"h": PhraseTarget("h", ((0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)))}
    half = {"h": (0.0, 0.0, 0.5, 1.0)}  # IoU exactly 0.5 (with the merged box, and with the first box) counts
    assert phrase_recall(half, corners, "merged")["recall@1"] == 1.0
    assert phrase_recall(half, corners, "any")["recall@1"] == 1.0
    wider = {"h": (0.0, 0.0, 0.51, 1.0)}  # IoU 0.49 with the first box, 0.51 with the merged one
    assert phrase_recall(wider, corners, "any")["recall@1"] == 0.0
    assert phrase_recall(wider, corners, "merged")["recall@1"] == 1.0


def test_flickr_answers_are_batch_invariant_and_resume(model_and_processor, flickr_dir, tmp_path):
    model, processor = model_and_processor
    phrases = flickr_phrase_questions(flickr_dir, "test")
    one = evaluate_phrase_grounding(
        model, processor, phrases, tmp_path / "one", GenerationSettings(10, 1), progress=False
    )
    four = evaluate_phrase_grounding(
        model, processor, phrases, tmp_path / "four", GenerationSettings(10, 4), progress=False
    )
    lines = (tmp_path / "one" / "predictions.jsonl").read_text().splitlines(keepends=True)
    answers = {json.loads(line)["id"]: json.loads(line)["answer"] for line in lines}
    four_lines = (tmp_path / "four" / "predictions.jsonl").read_text().splitlines()
    assert answers == {json.loads(line)["id"]: json.loads(line)["answer"] for line in four_lines}
    assert (
        one == four
        and one["num_phrases"] == 7
        and set(one["skipped_phrases"]) == {"scene", "nobndbox", "not_annotated"}
    )
    assert (tmp_path / "one" / "metrics.md").read_text().startswith("| phrases |")

    # Resume from half the predictions: only the rest is generated, and a complete folder generates nothing.
    (tmp_path / "half").mkdir()
    shutil.copy(tmp_path / "one" / "eval_run.json", tmp_path / "half")
    (tmp_path / "half" / "predictions.jsonl").write_text("".join(lines[:3]))
    model.calls.clear()
    resumed = evaluate_phrase_grounding(
        model, processor, phrases, tmp_path / "half", GenerationSettings(10, 1), progress=False
    )
    assert sum(model.calls) == 7 - 3 and resumed == one
    model.calls.clear()
    evaluate_phrase_grounding(model, processor, phrases, tmp_path / "one", GenerationSettings(10, 1), progress=False)
    assert model.calls == []


def test_phrase_grounding_on_region_text_records(small_world):
    records = read_region_text(small_world)
    phrases = region_phrase_questions(records)
    expected = sum(len([e for e in r.expressions if e.strip()]) for rec in records for r in rec.regions)
    assert len(phrases.questions) == expected and phrases.num_images == len(records)
    first = records[0].regions[0]
    target = phrases.targets[f"{records[0].id}-g0-0"]
    assert target.boxes == (tuple(first.box),) and target.types == (first.category,)
    assert phrases.questions[0].text.startswith("Where is ")


def test_flickr30k_command_line(saved_model, flickr_dir, small_world, tmp_path, capsys):
    args = ["flickr30k", "--model", str(saved_model), "--data", str(flickr_dir), "--split", "test"]
    args += ["--out", str(tmp_path / "flickr"), "--max-new-tokens", "6", "--batch-size", "3", "--no-progress"]
    assert eval_main([*args, "--protocol", "any"]) == 0
    metrics = json.loads((tmp_path / "flickr" / "metrics.json").read_text())
    assert metrics["protocol"] == "any" and metrics["recall@1"] == metrics["any"]["recall@1"]
    assert "| phrases | Recall@1 (merged boxes) | Recall@1 (any box) |" in capsys.readouterr().out
    world = ["flickr30k", "--model", str(saved_model), "--data", str(small_world), "--out", str(tmp_path / "w")]
    assert eval_main([*world, "--max-new-tokens", "6", "--no-progress"]) == 0
    assert json.loads((tmp_path / "w" / "metrics.json").read_text())["num_phrases"] > 0
    missing = ["flickr30k", "--model", str(saved_model), "--data", str(tmp_path / "nowhere"), "--out", "x"]
    assert eval_main(missing) == 2
    assert eval_main([*args[:-1], "--batch-size", "0"]) == 2


# ----- the judge -----------------------------------------------------------------------------------------------------


def _assistant_2(prompt: str) -> str:
    match = re.search(r"\[Assistant 2\]\n(.*?)\n\n\[End of Assistant 2\]", prompt, re.S)
    return match.group(1) if match else ""


def model_score(answer: str) -> int:
    """The stand-in judge's score of an answer: deterministic in its length."""
    return 1 + len(answer) % 9


class JudgeServer:
    """A local OpenAI-compatible chat endpoint: scores ``8`` for the reference and :func:`model_score` for the
    answer, after the scripted replies (``"500"``, ``"400"``, ``"malformed"``, ``"not_json"``) for the first
    requests."""

    def __init__(self, script: list[str] | None = None) -> None:
        self.script = list(script or [])
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "body": body, "auth": self.headers["Authorization"]})
                    step = server.script.pop(0) if server.script else "ok"
                if step in ("500", "400"):
                    self._send(int(step), b'{"error": "scripted"}')
                    return
                if step == "not_json":
                    self._send(200, b"<html>gateway</html>")
                    return
                answer = _assistant_2(body["messages"][-1]["content"])
                content = "I cannot decide." if step == "malformed" else f"8 {model_score(answer)}\nBecause."
                reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                self._send(200, json.dumps(reply).encode())

            def _send(self, status: int, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def judge_server() -> Iterator[JudgeServer]:
    server = JudgeServer()
    yield server
    server.close()


def test_parse_two_scores_is_robust():
    assert parse_two_scores("8 7\nAssistant 1 was more detailed.") == (8.0, 7.0)
    assert parse_two_scores("\n  8, 6.5  \nexplanation") == (8.0, 6.5)
    assert parse_two_scores("**9** **4**") == (9.0, 4.0)
    assert parse_two_scores("Assistant 1: 8 Assistant 2: 3") == (8.0, 3.0)
    assert parse_two_scores("8/10 7/10") == (8.0, 7.0)
    for bad in ("I cannot decide.", "8\n7", "8 7 6", "11 3", "", None, 8):
        assert parse_two_scores(bad) is None


def test_judge_retries_caches_and_reports_malformed_replies(judge_server, tmp_path):
    judge_server.script = ["500", "not_json", "malformed"]
    sleeps: list[float] = []
    settings = JudgeSettings(judge_server.base_url, "judge-x", api_key="secret", backoff=0.5, reply_retries=2)
    judge = ChatJudge(settings, tmp_path / "cache.jsonl", sleep=sleeps.append)
    messages = [{"role": "user", "content": "[Assistant 2]\nabc\n\n[End of Assistant 2]"}]
    result = judge.judge(messages, parse_two_scores)
    assert result.parsed == (8.0, float(model_score("abc"))) and not result.cached
    assert judge.requests_made == 4 and sleeps == [0.5]  # 500 -> retry; not JSON, malformed -> asked again
    assert judge_server.requests[0]["path"] == "/v1/chat/completions"
    assert judge_server.requests[0]["auth"] == "Bearer secret"
    body = judge_server.requests[0]["body"]
    assert body["model"] == "judge-x" and body["temperature"] == 0.2 and body["max_tokens"] == 1024

    again = ChatJudge(settings, tmp_path / "cache.jsonl")  # a new process: the cache file answers
    assert again.judge(messages, parse_two_scores).cached and again.requests_made == 0

    judge_server.script = ["malformed"] * 3
    failed = ChatJudge(settings, tmp_path / "cache.jsonl").judge(
        [{"role": "user", "content": "other"}], parse_two_scores
    )
    assert failed.parsed is None and "two scores" in failed.error and failed.content == "I cannot decide."

    judge_server.script = ["400"]
    with pytest.raises(JudgeError, match="HTTP 400"):
        ChatJudge(settings).judge([{"role": "user", "content": "x"}], parse_two_scores)
    judge_server.script = ["500"] * 3
    with pytest.raises(JudgeError, match="still failing after 3 tries"):
        ChatJudge(JudgeSettings(judge_server.base_url, "m", max_retries=2, backoff=0.0)).judge(
            [{"role": "user", "content": "y"}], parse_two_scores
        )


# ----- Ferret-Bench --------------------------------------------------------------------------------------------------


@needs_ferret_data
def test_ferret_bench_files_and_questions(model_and_processor, tmp_path):
    _, processor = model_and_processor
    items = load_ferret_bench(FERRET_DATA)
    assert len(items) == 120 and len({i.id for i in items}) == 120
    assert {i.category for i in items} == {"refer_desc", "refer_reason", "ground_conv"}
    first = items[0]
    assert first.id == "refer_caption-0" and first.image == "000000069138.jpg"
    assert first.context.startswith("Objects:\n") and first.reference.startswith("The object is a sign")
    question = ferret_question(first, tmp_path, processor)
    box = (0.621, 0.082, 0.772, 0.132)
    assert (
        question.text
        == f"What is the interaction between the object {processor.format_region(box)} and its surroundings?"
    )
    assert question.boxes == (box,) and question.image == tmp_path / "000000069138.jpg"
    two = next(
        i for i in items if i.task == "refer_caption" and len(ferret_question(i, tmp_path, processor).boxes) == 2
    )
    assert ferret_question(two, tmp_path, processor).text.count("<region>") == 2
    grounding = next(i for i in items if i.task == "ground_conv")
    assert ferret_question(grounding, tmp_path, processor).boxes == ()
    assert set(load_rules(FERRET_DATA)) == {"refer_desc", "refer_reason", "ground_conv"}


@needs_ferret_data
def test_judge_prompt_and_answer_post_processing():
    item = load_ferret_bench(FERRET_DATA, ["ground_conv"], limit=1)[0]
    rule = load_rules(FERRET_DATA)["ground_conv"]
    assert answer_for_judge("A sign [620, 82, 771, 132] on a wall.", "refer_desc", CODEC) == "A sign on a wall."
    shown = answer_for_judge("The man [201, 2, 939, 757] jumps [1, 2, 3].", "ground_conv", CODEC)
    assert shown == "The man [0.201, 0.002, 0.940, 0.758] jumps [1, 2, 3]."
    system, user = review_messages(item, "my answer", rule)
    assert system == {"role": "system", "content": JUDGE_SYSTEM_PROMPT}
    content = user["content"]
    assert content.startswith(f"[Context]\n{item.context}\n\n[Question]\n{item.question}\n\n")
    assert f"[Assistant 1]\n{item.reference}\n\n[End of Assistant 1]\n\n" in content
    assert content.endswith(f"[Assistant 2]\nmy answer\n\n[End of Assistant 2]\n\n[System]\n{rule['prompt']}\n\n")


def test_ferret_score_is_mean_model_over_mean_reference():
    metrics = ferret_scores({"refer_caption": [(8, 6), (6, 8)], "refer_reason": [(10, 5)], "ground_conv": [(4, 6)]})
    assert metrics["refer_caption"]["score"] == pytest.approx(100.0)
    assert metrics["refer_reason"]["score"] == pytest.approx(50.0)
    assert metrics["ground_conv"]["score"] == pytest.approx(150.0)
    assert metrics["refer_caption"]["judged"] == 2 and metrics["refer_caption"]["model_mean"] == 7
    assert metrics["average"] == pytest.approx(100.0)
    assert metrics["all_pooled"] == pytest.approx(100 * (25 / 5) / (28 / 5))
    empty = ferret_scores({"refer_caption": []})
    assert empty["refer_caption"]["score"] is None and empty["average"] is None


@needs_ferret_data
def test_ferret_bench_command_line_with_a_local_judge(saved_model, judge_server, tmp_path, capsys):
    items = load_ferret_bench(FERRET_DATA, limit=2)
    images = tmp_path / "coco"
    images.mkdir()
    for n, item in enumerate(items[1:]):  # the first image stays missing: an unanswered question
        Image.new("RGB", (64 + 8 * n, 48), (20 * n % 255, 100, 50)).save(images / item.image, format="JPEG")
    judge_server.script = ["500", "malformed"]
    args = ["ferret-bench", "--model", str(saved_model), "--data", str(FERRET_DATA), "--images", str(images)]
    args += ["--judge-base-url", judge_server.base_url, "--judge-model", "judge-x", "--judge-workers", "2"]
    args += ["--out", str(tmp_path / "ferret"), "--limit", "2", "--max-new-tokens", "8", "--no-progress"]
    assert eval_main(args) == 1  # 1 of 6 images missing: more than the default --max-failed-fraction
    assert "1 of 6 questions could not be answered" in capsys.readouterr().err and not judge_server.requests
    args += ["--max-failed-fraction", "0.2"]
    assert eval_main(args) == 0
    assert len(judge_server.requests) == 5 + 2  # 5 answered questions, one 500 retried, one malformed re-asked
    metrics = json.loads((tmp_path / "ferret" / "metrics.json").read_text())
    reviews = [json.loads(line) for line in (tmp_path / "ferret" / "reviews.jsonl").read_text().splitlines()]
    assert [r["id"] for r in reviews] == [i.id for i in items]
    assert reviews[0]["status"] == "unanswered" and metrics["refer_caption"]["unanswered"] == 1
    assert items[0].image in reviews[0]["error"]  # the failure's reason
    for task in ("refer_caption", "refer_reason", "ground_conv"):
        judged = [r for r in reviews if r["task"] == task and r["status"] == "judged"]
        expected = 100 * sum(model_score(r["answer"]) for r in judged) / (8 * len(judged))
        assert metrics[task]["score"] == pytest.approx(expected) and metrics[task]["judged"] == len(judged)
        assert all(r["scores"] == [8, model_score(r["answer"])] for r in judged)
    assert metrics["average"] == pytest.approx(
        sum(metrics[t]["score"] for t in ("refer_caption", "refer_reason", "ground_conv")) / 3
    )
    predictions = (tmp_path / "ferret" / "predictions.jsonl").read_text().splitlines()
    refer = json.loads(next(line for line in predictions if '"refer_reason-' in line))
    assert "<region>" in refer["question"]
    assert "| **average** |" in capsys.readouterr().out

    # A rerun asks again only the question whose image failed (still missing: one more failed line) and pays the
    # judge nothing.
    assert eval_main(args) == 0
    assert len(judge_server.requests) == 7
    lines = (tmp_path / "ferret" / "predictions.jsonl").read_text().splitlines()
    assert lines[: len(predictions)] == predictions and len(lines) == len(predictions) + 1
    assert json.loads(lines[-1])["id"] == items[0].id and json.loads(lines[-1])["status"] == "failed"
    assert json.loads((tmp_path / "ferret" / "metrics.json").read_text()) == metrics

    no_judge = args.copy()
    no_judge[no_judge.index("--judge-base-url") + 1] = ""
    assert eval_main(no_judge) == 2
