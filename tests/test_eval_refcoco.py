"""RefCOCO-family REC / REG evaluation: the three real layouts (refer pickle, MDETR json, lmms-lab parquet) and the
region-text one, prompts, scoring with exact numbers, caption metrics, resume, batch invariance and the command line.

Fixtures are written by the tests: two tiny JPEG "COCO" images, three val objects (one train object that must be
left out) in each layout."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cloc_encoder.data.converters.common import ConversionError
from cloc_encoder.data.synthetic import SyntheticWorldConfig, generate_world
from eval.caption_metrics import caption_metrics, java_available, simple_tokenize
from eval.cli import main as eval_main
from eval.mllm_generation import GenerationSettings, PredictionStore
from eval.refcoco.data import RefSample, read_ref_samples
from eval.refcoco.evaluate import evaluate_rec, evaluate_reg, rec_question_text, rec_questions, reg_questions
from eval.regions.tasks import score_grounding
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
from mllm.box_codec import get_box_codec
from mllm.tiny import tiny_config

IMAGES = {1: (40, 30), 2: (32, 48)}  # COCO image id -> (width, height)
# ann id -> (image id, bbox [x, y, w, h] pixels, split, sentences)
OBJECTS = {
    101: (1, [4, 3, 16, 12], "val", ["left red box", "the red one"]),
    102: (1, [20, 10, 18, 19.5], "val", ["blue box on the right"]),
    201: (2, [0, 0, 32, 24], "val", ["top half", "green thing at the top"]),
    202: (2, [0, 24, 32, 24], "train", ["bottom half"]),
}
VAL_IDS = ["101", "102", "201"]


def _file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    """The same content in the refer, MDETR and lmms-lab parquet layouts; images in ``<root>/train2014``."""
    root = tmp_path_factory.mktemp("refcoco")
    (root / "train2014").mkdir()
    for image_id, (width, height) in IMAGES.items():
        image = Image.new("RGB", (width, height), (20 * image_id, 90, 160))
        image.paste((250, 10, 10), (4, 3, 20, 15))
        image.save(root / "train2014" / _file_name(image_id), quality=95)

    refer = root / "refer" / "refcoco"
    refer.mkdir(parents=True)
    refs = [
        {
            "ref_id": index,
            "ann_id": ann_id,
            "image_id": image_id,
            "category_id": 1,
            "split": split,
            "sent_ids": list(range(len(sentences))),
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
            "sentences": [{"sent": s, "raw": s, "tokens": s.split(), "sent_id": n} for n, s in enumerate(sentences)],
        }
        for index, (ann_id, (image_id, _, split, sentences)) in enumerate(OBJECTS.items())
    ]
    (refer / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    instances = {
        "images": [{"id": i, "width": w, "height": h, "file_name": _file_name(i)} for i, (w, h) in IMAGES.items()],
        "annotations": [{"id": a, "image_id": o[0], "bbox": o[1], "category_id": 1} for a, o in OBJECTS.items()],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (refer / "instances.json").write_text(json.dumps(instances))

    mdetr = root / "mdetr"
    mdetr.mkdir()
    entries, annotations = [], []
    for ann_id, (image_id, bbox, split, sentences) in OBJECTS.items():
        for sentence in sentences if split == "val" else []:
            width, height = IMAGES[image_id]
            entry_id = len(entries)
            entries.append(
                {"id": entry_id, "file_name": _file_name(image_id), "width": width, "height": height}
                | {"original_id": image_id, "caption": sentence, "dataset_name": "refcoco", "tokens_negative": []}
            )
            annotations.append(
                {"id": entry_id, "image_id": entry_id, "bbox": bbox, "original_id": ann_id} | {"area": 1}
            )
    (mdetr / "finetune_refcoco_val.json").write_text(json.dumps({"images": entries, "annotations": annotations}))

    rows = []
    for ann_id, (image_id, bbox, split, sentences) in [*OBJECTS.items(), (999, (1, [0, 0, 1, 1], "val", ["x"]))]:
        if split == "val":
            data = (root / "train2014" / _file_name(image_id)).read_bytes() if ann_id != 999 else b"not an image"
            rows.append(
                {"question_id": str(ann_id), "image": {"bytes": data, "path": None}, "question": "q"}
                | {"answer": sentences, "segmentation": [], "bbox": [float(v) for v in bbox], "iscrowd": 0}
                | {"file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg"}
            )
    (root / "lmms" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "lmms" / "data" / "val-00000-of-00001.parquet")
    return {"root": root, "refer": root / "refer", "mdetr": mdetr, "parquet": root / "lmms"}


def _read(layouts, name: str, **kwargs) -> tuple[list[RefSample], str]:
    cache = layouts["root"] / "cache"
    samples, used, _ = read_ref_samples(layouts[name], dataset="refcoco", split="val", cache_dir=cache, **kwargs)
    return samples, used


class CountingModel(CLOCLlavaForConditionalGeneration):
    """Counts the sequences it is asked to generate."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.generated = 0

    def generate(self, *args, **kwargs):
        self.generated += kwargs["input_ids"].shape[0]
        return super().generate(*args, **kwargs)


@pytest.fixture()
def model_and_processor(chat_tokenizer):
    torch.manual_seed(0)
    config = tiny_config(chat_tokenizer, text_config={"initializer_range": 0.2})
    model = CountingModel._from_config(config).eval()
    return model, CLOCLlavaProcessor.from_model_config(config, chat_tokenizer)


def _key(sample: RefSample) -> tuple:
    return (sample.id, sample.width, sample.height, sample.box, sample.expressions, sample.references)


def test_the_three_layouts_give_the_same_samples(layouts):
    read = {name: _read(layouts, name) for name in ("refer", "mdetr", "parquet")}
    assert {name: used for name, (_, used) in read.items()} == {n: n for n in read}  # detected
    keys = {name: sorted(_key(s) for s in samples) for name, (samples, _) in read.items()}
    assert keys["refer"] == keys["mdetr"] == keys["parquet"]
    by_id = {s.id: s for s in read["refer"][0]}
    assert sorted(by_id) == VAL_IDS  # the train object is left out
    assert by_id["101"].box == pytest.approx((0.1, 0.1, 0.5, 0.5))
    assert by_id["101"].expressions == ("left red box", "the red one") == by_id["101"].references
    for name, (samples, _) in read.items():  # the same pixels (parquet images come from the cache)
        assert {s.id: s.image.read_bytes() for s in samples} == {i: s.image.read_bytes() for i, s in by_id.items()}
        assert all(s.image.is_absolute() for s in samples), name


def test_readers_report_skips_limit_and_refuse_unsafe_pickles(layouts, tmp_path):
    _, _, report = read_ref_samples(layouts["parquet"], dataset="refcoco", split="val", cache_dir=tmp_path / "c")
    assert report.skipped == {"unreadable_image": 1}
    limited, _, _ = read_ref_samples(
        layouts["parquet"], dataset="refcoco", split="val", cache_dir=tmp_path / "c", limit=2
    )
    assert [s.id for s in limited] == VAL_IDS[:2]
    with pytest.raises(FileNotFoundError, match="testB"):
        read_ref_samples(layouts["mdetr"], dataset="refcoco", split="testB")

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    evil = tmp_path / "evil" / "refcoco"
    evil.mkdir(parents=True)
    (evil / "refs(unc).p").write_bytes(pickle.dumps([Evil()], protocol=2))
    (evil / "instances.json").write_text("{}")
    with pytest.raises(ConversionError, match="refused to load global"):
        read_ref_samples(evil.parent, dataset="refcoco", split="val")


def test_prompts_and_questions(layouts, chat_tokenizer):
    assert rec_question_text("default", "man on left") == "Where is the man on left?"
    assert rec_question_text("ferret", "man on left") == "What is the location of man on left in the image?"
    assert rec_question_text("llava", "man on left") == (
        "Please provide the bounding box coordinate of the region this sentence describes: man on left"
    )
    samples, _ = _read(layouts, "refer")
    questions, targets = rec_questions(samples)
    assert [q.id for q in questions] == ["101-0", "101-1", "102-0", "201-0", "201-1"]
    assert targets["201-1"].box == pytest.approx((0.0, 0.0, 1.0, 0.5))
    assert len(rec_questions(samples, expressions="first")[0]) == 3
    processor = CLOCLlavaProcessor.from_model_config(tiny_config(chat_tokenizer), chat_tokenizer)
    reg, references = reg_questions(samples, processor)
    assert reg[0].text == f"What is {processor.format_region(samples[0].box)}?" and reg[0].boxes == (samples[0].box,)
    assert references["201"] == ("top half", "green thing at the top")


def test_rec_metrics_exact_numbers_and_malformed_answers_are_misses():
    codec = get_box_codec("float")  # 0.25 / 0.5 / 0.75 survive the text round trip exactly
    target = RefSample("o", Path("x.jpg"), 10, 10, (0.0, 0.0, 0.5, 0.5), ("a", "b", "c", "d", "e", "f"), ("a",))
    _, targets = rec_questions([target])
    answers = {
        "o-0": "It is at [0.000, 0.000, 0.500, 0.500].",  # IoU 1
        "o-1": "[0.000, 0.000, 0.500, 1.000]",  # IoU 0.5 (counts at 0.5)
        "o-2": "[0.250, 0.000, 0.750, 0.500]",  # IoU 1/3
        "o-3": "[0.1, 0.2, 0.3]",  # three numbers: no box
        "o-4": "somewhere on the left",  # no box
        # "o-5": never answered
    }
    metrics = score_grounding({k: {"answer": v} for k, v in answers.items()}, targets, codec)
    assert metrics["num_questions"] == 6 and metrics["no_box"] == 3
    assert metrics["acc@0.5"] == pytest.approx(2 / 6) and metrics["acc@0.3"] == pytest.approx(3 / 6)
    assert metrics["acc@0.6"] == pytest.approx(1 / 6)
    assert metrics["miou"] == pytest.approx((1 + 0.5 + 1 / 3) / 6)
    assert metrics["center_acc"] == pytest.approx(3 / 6)


def test_caption_metrics_on_hand_made_answers():
    references = {
        "a": ["a red car parked on the left", "the red car"],
        "b": ["man in a blue shirt standing", "blue shirt guy"],
        "c": ["small dog sleeping under the table", "the dog"],
    }
    perfect = caption_metrics({k: v[0] for k, v in references.items()}, references, tokenizer="simple", meteor=False)
    assert perfect["bleu_4"] == pytest.approx(1.0, abs=1e-6) and perfect["rouge_l"] == pytest.approx(1.0)
    assert 0 < perfect["cider"] < 10  # averaged over both references; the second one differs
    single = {k: v[:1] for k, v in references.items()}
    alone = caption_metrics({k: v[0] for k, v in single.items()}, single, tokenizer="simple", meteor=False)
    assert alone["cider"] == pytest.approx(10.0)  # one reference, with n-grams of every order found nowhere else
    assert perfect["tokenizer"] == "simple" and perfect["meteor"] is None and "not requested" in perfect["meteor_note"]
    wrong = {"a": "a blue shirt", "b": "the dog", "c": None}  # swapped, and one missing answer
    worse = caption_metrics(wrong, references, tokenizer="simple", meteor=False)
    assert worse["bleu_4"] < 0.01 and worse["cider"] < perfect["cider"] / 5 and worse["rouge_l"] < perfect["rouge_l"]
    assert simple_tokenize("The man's hat, on the LEFT.") == "the man 's hat on the left"
    with pytest.raises(ValueError, match="no reference"):
        caption_metrics({"a": "x"}, {"a": [""]}, tokenizer="simple", meteor=False)


@pytest.mark.skipif(not java_available(), reason="the PTB tokenizer and METEOR need Java")
def test_caption_metrics_with_ptb_and_meteor():
    references = {"a": ["the red car on the left"], "b": ["a man in a blue shirt"]}
    perfect = caption_metrics({"a": "The red car, on the left.", "b": "A man in a blue shirt"}, references)
    assert perfect["tokenizer"] == "ptb" and perfect["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["meteor"] > 0.9
    worse = caption_metrics({"a": "a dog", "b": "the sky"}, references)
    assert worse["meteor"] < 0.3 and worse["cider"] < perfect["cider"]


def _answers(path: Path) -> dict[str, str | None]:
    return {i: p["answer"] for i, p in PredictionStore(path).predictions.items()}


def test_rec_run_resume_and_batch_invariance(model_and_processor, layouts, tmp_path):
    model, processor = model_and_processor
    samples, _ = _read(layouts, "mdetr")
    one = evaluate_rec(model, processor, samples, tmp_path / "one", settings=GenerationSettings(8, 1), progress=False)
    assert model.generated == 5 and one["rec"]["num_questions"] == 5
    four = evaluate_rec(model, processor, samples, tmp_path / "four", settings=GenerationSettings(8, 4), progress=False)
    answers = _answers(tmp_path / "one" / "predictions_rec.jsonl")
    assert answers == _answers(tmp_path / "four" / "predictions_rec.jsonl")
    assert len(set(answers.values())) > 1  # the answers depend on the question
    assert one["rec"] == four["rec"]
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["rec"] == one["rec"]
    assert (tmp_path / "one" / "metrics.md").read_text().startswith("| REC")

    # Resume: a rerun (another batch size is the same run) asks nothing; a half-written file asks only the rest.
    model.generated = 0
    evaluate_rec(model, processor, samples, tmp_path / "one", settings=GenerationSettings(8, 3), progress=False)
    assert model.generated == 0
    path = tmp_path / "one" / "predictions_rec.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][:10])  # two answers and a torn line
    again = evaluate_rec(model, processor, samples, tmp_path / "one", settings=GenerationSettings(8, 2), progress=False)
    assert model.generated == 3 and again["rec"] == one["rec"]
    assert sorted(json.loads(line)["id"] for line in path.read_text().splitlines()) == sorted(answers)
    with pytest.raises(ValueError, match="differs in prompt"):
        evaluate_rec(model, processor, samples, tmp_path / "one", prompt="ferret", progress=False)


def test_malformed_model_answers_score_as_misses(model_and_processor, layouts, tmp_path):
    model, processor = model_and_processor
    samples, _ = _read(layouts, "refer")
    out = tmp_path / "rec"
    out.mkdir()
    exact = processor.format_box(samples[0].box)
    bad = ["[1, 2, 3]", "[nan, 0, 5, 5]", "no idea", None]
    lines = [{"id": "101-0", "answer": f"here: {exact}"}] + [
        {"id": i, "answer": a} for i, a in zip(["101-1", "102-0", "201-0", "201-1"], bad, strict=True)
    ]
    (out / "predictions_rec.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    metrics = evaluate_rec(model, processor, samples, out, progress=False)
    assert model.generated == 0
    assert metrics["rec"]["acc@0.5"] == pytest.approx(1 / 5) and metrics["rec"]["no_box"] == 4


def test_reg_run_on_parquet(model_and_processor, layouts, tmp_path):
    model, processor = model_and_processor
    samples, _ = _read(layouts, "parquet")
    settings = GenerationSettings(8, 2)
    metrics = evaluate_reg(
        model, processor, samples, tmp_path, settings=settings, tokenizer="simple", meteor=False, progress=False
    )
    assert metrics["reg"]["num_questions"] == 3 and metrics["reg"]["tokenizer"] == "simple"
    assert {"bleu_4", "rouge_l", "cider", "meteor"} <= set(metrics["reg"])
    predictions = PredictionStore(tmp_path / "predictions_reg.jsonl").predictions
    assert sorted(predictions) == VAL_IDS and predictions["101"]["question"].startswith("What is [")
    assert "Tokenizer: simple. METEOR not requested." in (tmp_path / "metrics.md").read_text()


def test_command_line(model_and_processor, layouts, tmp_path, capsys):
    model, processor = model_and_processor
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--no-progress", "--max-new-tokens", "6", "--batch-size", "4"]
    refer = ["--data", str(layouts["refer"]), "--dataset", "refcoco", "--split", "val"]
    assert eval_main(["refcoco", *refer, *common, "--out", str(tmp_path / "rec")]) == 0
    metrics = json.loads((tmp_path / "rec" / "metrics.json").read_text())
    assert metrics["format"] == "refer" and metrics["rec"]["num_questions"] == 5
    assert "| REC refcoco val (refer), prompt default | Acc@0.5 |" in capsys.readouterr().out

    parquet = ["--data", str(layouts["parquet"]), "--dataset", "refcoco", "--split", "val", "--tokenizer", "simple"]
    assert eval_main(["reg", *parquet, *common, "--no-meteor", "--out", str(tmp_path / "reg")]) == 0
    reg = json.loads((tmp_path / "reg" / "metrics.json").read_text())
    assert reg["reg"]["meteor"] is None and reg["skipped"] == {"unreadable_image": 1}

    world = tmp_path / "world"
    generate_world(SyntheticWorldConfig(image_size=32), world, {"test": 2})
    synthetic = ["--data", str(world / "test.jsonl"), "--limit", "2"]
    assert eval_main(["refcoco", *synthetic, *common, "--prompt", "llava", "--out", str(tmp_path / "syn")]) == 0
    assert json.loads((tmp_path / "syn" / "metrics.json").read_text())["format"] == "regiontext"
    assert eval_main(["reg", *synthetic, *common, "--no-meteor", "--out", str(tmp_path / "syn_reg")]) == 0

    assert eval_main(["refcoco", "--data", str(layouts["refer"]), *common, "--out", str(tmp_path / "x")]) == 2
    assert "--dataset and --split" in capsys.readouterr().err
    testa = [*refer[:2], "--dataset", "refcoco", "--split", "testA"]
    assert eval_main(["refcoco", *testa, *common, "--out", str(tmp_path / "y")]) == 2
    assert "no refs in split 'testA'" in capsys.readouterr().err
