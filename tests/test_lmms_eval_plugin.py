"""The lmms-eval plugin (``eval.lmms_eval_plugin``): entry-point registration, batched greedy answers, box rewriting,
loglikelihood, multi-round, and lmms-eval's own RefCOCO REC scores against this project's on the same outputs.

The RefCOCO data is written here as parquet in the ``lmms-lab/RefCOCO`` schema and run through lmms-eval's
built-in REC task functions (``--include_path`` task YAML from :func:`write_rec_task`); nothing is downloaded.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (optional: pip install 'cloc-mllm[lmms]')")
datasets = pytest.importorskip("datasets", reason="datasets is not installed (comes with lmms-eval)")

from eval import lmms_eval_plugin  # noqa: E402
from eval.lmms_eval_plugin import rewrite_boxes, truncate_at, write_rec_task  # noqa: E402
from eval.refcoco.export import refcoco_features  # noqa: E402
from eval.regions.tasks import GroundingTarget, grounding_metrics  # noqa: E402
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor  # noqa: E402
from mllm.box_codec import get_box_codec  # noqa: E402
from mllm.tiny import tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASK = "refcoco_bbox_rec_local"
INT999, FLOAT = get_box_codec("int999"), get_box_codec("float")
METRICS = {  # lmms-eval metric → this project's grounding_metrics key
    "refcoco_IoU": "miou",
    "refcoco_ACC@0.1": "acc@0.1",
    "refcoco_ACC@0.3": "acc@0.3",
    "refcoco_ACC@0.5": "acc@0.5",
    "refcoco_ACC@0.7": "acc@0.7",
    "refcoco_ACC@0.9": "acc@0.9",
    "refcoco_Center_ACC": "center_acc",
}

# (image size, bbox [x, y, w, h] pixels, expressions); no box touches the image origin (lmms-eval scores a missing
# box as [0, 0, 0, 0], whose centre would lie in such a box).
ROWS = [
    ((48, 32), [4, 3, 20, 12], ["red circle", "left thing"]),
    ((32, 40), [10, 12, 16, 20], ["blue square"]),
    ((40, 40), [20, 2, 18, 30], ["green triangle"]),
    ((56, 32), [30, 10, 20, 18], ["yellow circle", "the right one"]),
    ((32, 32), [2, 2, 28, 28], ["big square"]),
]
# What the scripted model answers per expression, as a transform of the normalised target box (None: no box).
SCRIPT = {
    "red circle": lambda b: b,  # exact
    "left thing": lambda b: (b[0], b[1], b[2] + 0.15, b[3]),  # wider: IoU about 0.6
    "blue square": lambda b: (b[0] + 0.25, b[1], b[2] + 0.25, b[3]),  # shifted: IoU about 0.1
    "green triangle": None,
    "yellow circle": lambda b: (b[0] - 0.1, b[1] - 0.1, b[2], b[3]),  # larger: IoU about 0.4
    "the right one": lambda b: (1 - b[2], b[1], 1 - b[0], b[3]),  # mirrored: IoU 0
    "big square": lambda b: (b[0] + 0.02, b[1], b[2], b[3] - 0.02),  # IoU about 0.95
}


@pytest.fixture(autouse=True, scope="module")
def _restore_pil_truncated_images_flag():
    """lmms-eval's task module sets PIL's process-wide ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` when imported; put
    it back after this module so later tests still see truncated images as errors (docs/evaluation.md)."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = before


@pytest.fixture(scope="module")
def rec_task(tmp_path_factory) -> Path:
    """RefCOCO-schema parquet + the task YAML; returns the include path."""
    root = tmp_path_factory.mktemp("rec")
    columns: dict[str, list] = {key: [] for key in ("question_id", "image", "question", "answer", "segmentation")}
    columns.update(bbox=[], iscrowd=[], file_name=[])
    for index, ((width, height), bbox, answers) in enumerate(ROWS):
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (40 * index, 90, 200 - 30 * index)).save(buffer, format="PNG")
        columns["question_id"].append(str(1000 + index))
        columns["image"].append({"bytes": buffer.getvalue(), "path": None})
        columns["question"].append("Please carefully observe the area circled in the image")
        columns["answer"].append(answers)
        x, y, w, h = bbox
        columns["segmentation"].append([x, y, x + w, y, x + w, y + h, x, y + h])
        columns["bbox"].append([float(v) for v in bbox])
        columns["iscrowd"].append(0)
        columns["file_name"].append(f"COCO_train2014_{index:012d}_{index}.jpg")
    features = refcoco_features()
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(root / "val.parquet"))
    write_rec_task(root / "tasks", root / "val.parquet", task=TASK)
    return root / "tasks"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, chat_tokenizer) -> Path:
    torch.manual_seed(0)
    config = tiny_config(chat_tokenizer, text_config={"initializer_range": 0.2})
    model = CLOCLlavaForConditionalGeneration._from_config(config).eval()
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    CLOCLlavaProcessor.from_model_config(config, chat_tokenizer).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


class ScriptedCLOCLlava(lmms_eval_plugin.CLOCLlava):
    """The plugin with a scripted ``_generate``: known int999 boxes per expression (the rest of the plugin — request
    grouping, batching, truncation at ``until``, box rewriting — runs as is)."""

    def _generate(self, contexts, images, max_new_tokens):
        self.calls.append(len(contexts))
        answers = []
        for context, sample in zip(contexts, images, strict=True):
            (image,) = sample
            expression = next(e for e in SCRIPT if context.endswith(": " + e))
            target = next(r for r in ROWS if expression in r[2])
            (width, height), (x, y, w, h) = target[0], target[1]
            assert image.size == (width, height)
            script = SCRIPT[expression]
            if script is None:
                answers.append("I cannot see it. ASSISTANT: [1, 2, 3, 4]")  # text after the stop string is cut
                continue
            box = script((x / width, y / height, (x + w) / width, (y + h) / height))
            answers.append(f"It is at {INT999.encode(box)}.")
            self.raw[expression] = answers[-1]
        return answers


def _evaluate(model, task_dir: Path, **kwargs) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("ERROR", include_path=str(task_dir), include_defaults=False)
    return simple_evaluate(
        model=model, tasks=[TASK], task_manager=manager, log_samples=True, bootstrap_iters=0, **kwargs
    )


def _response(sample: dict) -> str:
    """The answer lmms-eval scored (in memory a list, in the CLI's samples file a string)."""
    response = sample["filtered_resps"]
    return response if isinstance(response, str) else response[0]


def _target(sample: dict) -> GroundingTarget:
    """The normalised ground-truth box lmms-eval scored against (the doc in memory; the CLI logs the metric input)."""
    box = sample["doc"]["bbox"] if "doc" in sample else sample["refcoco_IoU"]["bbox"]
    return GroundingTarget(str(sample["doc_id"]), tuple(box))


def _project_scores(samples: list[dict], codec) -> dict:
    """This project's grounding_metrics of the answers lmms-eval logged (read with ``codec``)."""
    predicted = {str(s["doc_id"]): codec.parse_first_box(_response(s)) for s in samples}
    return grounding_metrics(predicted, {str(s["doc_id"]): _target(s) for s in samples})


def _assert_same_scores(results: dict, samples: list[dict], codec=FLOAT) -> dict:
    ours = _project_scores(samples, codec)
    for theirs, key in METRICS.items():
        assert results[TASK][f"{theirs},none"] == pytest.approx(ours[key], abs=1e-9), theirs
    return ours


# ----- pieces -------------------------------------------------------------------------------------------------------


def test_rewrite_boxes_and_truncation():
    text = "a [12, 340, 560, 999] b [1, 2, 3] c [999, 0, 0, 999]"
    assert rewrite_boxes(text, "int999") == "a [0.012, 0.340, 0.561, 1.000] b [1, 2, 3] c [0.000, 0.000, 1.000, 1.000]"
    assert rewrite_boxes("[0.1234, 0.5, 0.7, 0.9]", "float") == "[0.123, 0.500, 0.700, 0.900]"
    assert truncate_at("yes ASSISTANT: no", ["ASSISTANT:"]) == "yes " and truncate_at("x", []) == "x"


def test_entry_point_registers_cloc_llava():
    from lmms_eval.models import get_model

    (entry,) = [e for e in importlib.metadata.entry_points(group="lmms_eval.models") if e.name == "cloc_llava"]
    assert entry.load()().simple_class_path == "eval.lmms_eval_plugin.CLOCLlava"
    assert get_model("cloc_llava") is lmms_eval_plugin.CLOCLlava


def _requests(docs: list[dict], kind: str = "generate_until") -> tuple[dict, list[SimpleNamespace]]:
    task_dict = {"t": {"val": docs}}
    gen = {"until": ["ASSISTANT:"], "max_new_tokens": 6}
    to_visual = lambda doc: [doc["image"]]  # noqa: E731
    if kind == "generate_until":
        args = [(doc["q"], dict(gen), to_visual, i, "t", "val") for i, doc in enumerate(docs)]
    else:
        args = [(doc["q"], doc["a"], to_visual, i, "t", "val") for i, doc in enumerate(docs)]
    return task_dict, [SimpleNamespace(args=a) for a in args]


def _docs() -> list[dict]:
    shapes = ["circle", "square", "red triangle", "small blue circle", "thing", "green square at the top"]
    return [
        {"q": f"Where is the {s}?", "a": f" [{i}, {i + 9}, 500, 600]", "image": Image.new("RGB", (32 + i, 32), "red")}
        for i, s in enumerate(shapes)
    ]


def test_batched_answers_equal_batch_of_one_and_loglikelihood(model_dir):
    one = lmms_eval_plugin.CLOCLlava(pretrained=str(model_dir), batch_size=1, device="cpu")
    many = lmms_eval_plugin.CLOCLlava(pretrained=str(model_dir), batch_size="4", device="cpu")
    task_dict, requests = _requests(_docs())
    one.task_dict = many.task_dict = task_dict
    answers = one.generate_until(requests)
    assert many.generate_until(requests) == answers
    assert len(set(answers)) > 1  # the answers depend on the question

    task_dict, requests = _requests(_docs()[:2], "loglikelihood")
    one.task_dict = task_dict
    scores = one.loglikelihood(requests)
    context, continuation, *_ = requests[0].args
    inputs = one._inputs([one.prompt(context, 1)], [[task_dict["t"]["val"][0]["image"]]])
    target = one.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
    full = torch.cat([inputs["input_ids"], target], dim=1)
    with torch.no_grad():
        logits = one.model(input_ids=full, pixel_values=inputs["pixel_values"]).logits[0]
    steps = logits[inputs["input_ids"].shape[1] - 1 : -1].log_softmax(-1)
    expected = steps.gather(1, target[0][:, None]).sum().item()
    assert scores[0][0] == pytest.approx(expected, abs=1e-4) and scores[0][0] < 0
    assert scores[0][1] == bool((steps.argmax(-1) == target[0]).all())


def test_multi_round_feeds_previous_answers_back(model_dir):
    lm = lmms_eval_plugin.CLOCLlava(pretrained=str(model_dir), device="cpu", max_new_tokens=4)
    doc = {"image": Image.new("RGB", (32, 32), "blue")}
    lm.task_dict = {"t": {"val": [doc]}}
    seen = []

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        seen.append((list(previous_output), round_idx, previous_round_info))
        return [doc["image"]], f"Round {round_idx}?", round_idx == 2, previous_output, round_idx

    request = SimpleNamespace(args=("Round 0?", {}, lambda d: [d["image"]], doc_to_text, 0, "t", "val"))
    (rounds,) = lm.generate_until_multi_round([request])
    assert len(rounds) == 2 and [s[1:] for s in seen] == [(1, None), (2, 1)] and len(seen[1][0]) == 2


def test_unknown_model_args_are_refused(model_dir):
    with pytest.raises(TypeError, match="unknown model_args"):
        lmms_eval_plugin.CLOCLlava(pretrained=str(model_dir), temperature=0.5)
    with pytest.raises(ValueError, match="box_format"):
        lmms_eval_plugin.CLOCLlava(pretrained=str(model_dir), box_format="pixels")


# ----- lmms-eval's evaluator against this project's scores ---------------------------------------------------------


def test_lmms_eval_rec_scores_equal_project_scores_on_scripted_boxes(model_dir, rec_task):
    lm = ScriptedCLOCLlava(pretrained=str(model_dir), batch_size=3, device="cpu")
    lm.calls, lm.raw = [], {}
    output = _evaluate(lm, rec_task)
    samples = output["samples"][TASK]
    assert len(samples) == sum(len(r[2]) for r in ROWS) and max(lm.calls) == 3
    responses = {s["doc"]["answer"]: _response(s) for s in samples}
    assert responses["green triangle"] == "I cannot see it."  # cut at "ASSISTANT:" — no box
    assert responses["red circle"].startswith("It is at [0.") and responses["red circle"].count(".") == 5
    ours = _assert_same_scores(output["results"], samples)
    # Non-vacuous: the scripted boxes spread over the thresholds.
    assert ours["acc@0.5"] == pytest.approx(4 / 7) and 0 < ours["acc@0.9"] < ours["acc@0.1"] < 1
    assert ours["no_box"] == 1 and 0.3 < ours["miou"] < 0.7
    # Scored from the model's raw int999 answers (as `python -m eval regions` would) the numbers differ only by
    # the 3-decimal rounding of the rewritten boxes.
    raw = {str(s["doc_id"]): INT999.parse_first_box(lm.raw.get(s["doc"]["answer"])) for s in samples}
    from_raw = grounding_metrics(raw, {str(s["doc_id"]): _target(s) for s in samples})
    assert from_raw["acc@0.5"] == ours["acc@0.5"] and from_raw["miou"] == pytest.approx(ours["miou"], abs=2e-3)


def test_lmms_eval_runs_the_real_model_by_name(model_dir, rec_task):
    output = _evaluate("cloc_llava", rec_task, model_args=f"pretrained={model_dir},max_new_tokens=16", batch_size=4)
    samples = output["samples"][TASK]
    assert len(samples) == sum(len(r[2]) for r in ROWS)
    _assert_same_scores(output["results"], samples)  # whatever the random model wrote, both score it alike


def test_lmms_eval_command_line(model_dir, rec_task, tmp_path):
    out = tmp_path / "lmms_out"
    command = [sys.executable, "-m", "lmms_eval", "--model", "cloc_llava", "--tasks", TASK]
    command += ["--model_args", f"pretrained={model_dir},max_new_tokens=8", "--include_path", str(rec_task)]
    command += ["--output_path", str(out), "--log_samples", "--batch_size", "2", "--device", "cpu"]
    env = {**os.environ, "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "cache"), "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    # The lmms-eval CLI exits 0 even when evaluation failed: read its result files.
    results = sorted(out.rglob("*_results.json"))
    assert results, f"no results file (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    scores = json.loads(results[-1].read_text())["results"][TASK]
    samples = [json.loads(line) for path in out.rglob(f"*samples_{TASK}.jsonl") for line in path.open()]
    assert len(samples) == sum(len(r[2]) for r in ROWS)
    _assert_same_scores({TASK: scores}, samples)
