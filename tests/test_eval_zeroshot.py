"""Zero-shot encoder evaluation (``eval.zeroshot.evaluate``, ``python -m eval encoder-zeroshot``): COCO / LVIS region
classification and folder image classification, on fixtures written here in the real formats."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from cloc_encoder.data.convert import main as convert_main
from cloc_encoder.data.converters import convert_lvis
from cloc_encoder.data.format import read_region_text
from cloc_encoder.modeling_cloc import CLOCImageState, CLOCTextOutput
from eval.encoder import metrics as encoder_metrics
from eval.encoder.metrics import region_classification, topk_accuracy
from eval.zeroshot.cli import add_parser
from eval.zeroshot.evaluate import (
    ENSEMBLE_TEMPLATES,
    class_text_embeddings,
    evaluate_image_zeroshot,
    evaluate_region_zeroshot,
    load_image_folder,
    load_instance_set,
)

RED, BLUE, GREEN = (220, 20, 20), (20, 20, 220), (20, 200, 20)


# ----- fixtures in the real formats ---------------------------------------------------------------------------------


def _image(path: Path, size: tuple[int, int], colour: tuple[int, int, int] = RED) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _annotation(ann_id: int, image_id: int, category_id: int, bbox: list[float], crowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": crowd}


# Wide boxes (w > h) are "cat" to the oracle below, tall boxes "dog". Ground truth: cat 2 of 3 right, dog 1 of 1.
ANNOTATIONS = [
    _annotation(1, 1, 1, [2, 2, 20, 8]),  # cat, wide: right
    _annotation(2, 1, 2, [25, 2, 6, 20]),  # dog, tall: right
    _annotation(3, 2, 1, [4, 4, 6, 20]),  # cat, tall: wrong (dog)
    _annotation(4, 2, 1, [10, 20, 20, 6]),  # cat, wide: right
    _annotation(5, 2, 2, [0, 0, 32, 32], crowd=1),  # crowd: left out
    _annotation(6, 3, 2, [1, 1, 5, 20]),  # image 3 is corrupt: skipped with its box
    _annotation(7, 4, 1, [1, 1, 20, 5]),  # image 4 is missing: skipped
]


@pytest.fixture()
def coco(tmp_path: Path) -> tuple[Path, Path]:
    """``instances_val2017.json`` with 4 images (one corrupt, one missing) and 3 categories (zebra has no box)."""
    images = tmp_path / "val2017"
    _image(images / "000000000001.jpg", (40, 30))
    _image(images / "000000000002.jpg", (32, 32))
    (images / "000000000003.jpg").write_bytes(b"not a jpeg")
    data = {
        "images": [
            {"id": i, "file_name": f"00000000000{i}.jpg", "width": w, "height": h}
            for i, (w, h) in enumerate([(40, 30), (32, 32), (32, 32), (32, 32)], start=1)
        ],
        "annotations": ANNOTATIONS,
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "zebra"}],
    }
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps(data))
    return path, images


@pytest.fixture()
def lvis(tmp_path: Path) -> tuple[Path, Path]:
    """``lvis_v1_val.json``: images addressed by ``coco_url`` (train2017 and val2017), underscore names."""
    root = tmp_path / "coco"
    _image(root / "val2017" / "000000000001.jpg", (40, 30))
    _image(root / "train2017" / "000000000002.jpg", (32, 32))
    url = "http://images.cocodataset.org/{}/{:012d}.jpg"
    data = {
        "images": [
            {"id": 1, "coco_url": url.format("val2017", 1), "width": 40, "height": 30, "neg_category_ids": []},
            {"id": 2, "coco_url": url.format("train2017", 2), "width": 32, "height": 32, "neg_category_ids": []},
        ],
        "annotations": [{k: v for k, v in a.items() if k != "iscrowd"} for a in ANNOTATIONS[:4]],
        "categories": [
            {"id": 1, "name": "aerosol_can", "synonyms": ["aerosol_can", "spray_can"], "frequency": "c"},
            {"id": 2, "name": "bow_(weapon)", "synonyms": ["bow_(weapon)"], "frequency": "r"},
            {"id": 3, "name": "zebra", "synonyms": ["zebra"], "frequency": "f"},
        ],
    }
    path = tmp_path / "lvis_v1_val.json"
    path.write_text(json.dumps(data))
    return path, root


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """``root/cat`` (2 red, 1 blue), ``root/golden_retriever`` (2 blue), ``root/frog`` (1 green, 1 corrupt)."""
    root = tmp_path / "imagenet"
    for name, colours in (("cat", [RED, RED, BLUE]), ("golden_retriever", [BLUE, BLUE]), ("frog", [GREEN])):
        for index, colour in enumerate(colours):
            _image(root / name / f"{index}.png", (32, 32), colour)
    (root / "frog" / "broken.png").write_bytes(b"not a png")
    (root / "frog" / "notes.txt").write_text("not an image")
    return root


# ----- an oracle encoder whose answers are known ----------------------------------------------------------------


class VocabTokenizer:
    """Each distinct string gets one id (in the first position)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def id(self, text: str) -> int:
        return self.ids.setdefault(text, len(self.ids))

    def __call__(self, texts, *, max_length, **_):
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        ids[:, 0] = torch.tensor([self.id(text) for text in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class Oracle(nn.Module):
    """Duck-types :class:`CLOCModel`: a text is a one-hot vector; a region is the vector of ``template`` filled
    with ``wide`` (w > h) or ``tall``; an image is the vector of ``template`` filled with its colour's class."""

    size = 256

    def __init__(self, config, tokenizer: VocabTokenizer, template: str, wide: str, tall: str, colours: dict) -> None:
        super().__init__()
        self.config, self.tokenizer, self.template = config, tokenizer, template
        self.wide, self.tall, self.colours = wide, tall, colours
        self.anchor = nn.Parameter(torch.zeros(1))

    def _vector(self, name: str) -> torch.Tensor:
        return nn.functional.one_hot(torch.tensor(self.tokenizer.id(self.template.format(name))), self.size).float()

    def encode_text(self, input_ids, attention_mask=None) -> CLOCTextOutput:
        embeds = nn.functional.one_hot(input_ids[:, 0], self.size).float()
        return CLOCTextOutput(text_embeds=embeds, pooled=embeds)

    def encode_images(self, pixel_values: torch.Tensor) -> CLOCImageState:
        channel = pixel_values.mean(dim=(2, 3)).argmax(dim=1)  # 0 red, 1 green, 2 blue
        embeds = torch.stack([self._vector(self.colours.get(int(c), "")) for c in channel])
        return CLOCImageState(patch_tokens=torch.zeros(len(pixel_values), 1, 1), image_embeds=embeds)

    def region_embeddings(self, state, boxes, image_index):
        wide = (boxes[:, 2] - boxes[:, 0]) > (boxes[:, 3] - boxes[:, 1])
        return torch.stack([self._vector(self.wide if w else self.tall) for w in wide])


# ----- metrics ------------------------------------------------------------------------------------------------------


def test_topk_accuracy_and_chunked_region_classification(monkeypatch):
    classes = torch.eye(4)
    queries = torch.tensor([[1.0, 0.5, 0, 0], [0, 1.0, 0.9, 0], [0, 0, 0.2, 1.0], [0.1, 0.3, 0.2, 0.0]])
    labels = torch.tensor([0, 2, 3, 0])  # top-1 right for 0 and 2; second best for 1; third best for 3
    result = topk_accuracy(queries, classes, labels, ks=(1, 2, 3, 10))
    assert result == {"top1": 0.5, "top2": 0.75, "top3": 1.0, "top10": 1.0, "num_queries": 4}
    full = region_classification(queries, classes, labels)
    monkeypatch.setattr(encoder_metrics, "QUERY_CHUNK", 3)  # scored 3 queries at a time: same answer
    assert region_classification(queries, classes, labels) == full
    assert full["accuracy"] == 0.5 and full["mean_class_accuracy"] == pytest.approx((0.5 + 0 + 1) / 3)
    with pytest.raises(ValueError, match="labels must be"):
        topk_accuracy(queries, classes, labels[:2])


def test_template_ensemble_averages_normalised_embeddings(tiny_cloc):
    tokenizer = VocabTokenizer()
    oracle = Oracle(tiny_cloc.config, tokenizer, "{}", "a", "b", {})
    embeds = class_text_embeddings(oracle, tokenizer, ["cat", "dog"], ENSEMBLE_TEMPLATES)
    assert embeds.shape == (2, Oracle.size)
    cat = [tokenizer.id(t.format("cat")) for t in ENSEMBLE_TEMPLATES]
    assert embeds[0, cat].tolist() == pytest.approx([len(cat) ** -0.5] * len(cat))
    with pytest.raises(ValueError, match=r"exactly one '\{\}'"):
        class_text_embeddings(oracle, tokenizer, ["cat"], ["no slot"])


# ----- region classification -------------------------------------------------------------------------------------


def test_coco_region_classification_exact_scores_and_skips(tiny_cloc, coco):
    instances = load_instance_set(*coco, kind="coco")
    assert instances.class_names == ["cat", "dog", "zebra"]  # every category is a candidate
    assert instances.report.skipped["crowd_box"] == 1
    tokenizer = VocabTokenizer()
    oracle = Oracle(tiny_cloc.config, tokenizer, "{}", wide="cat", tall="dog", colours={})
    metrics = evaluate_region_zeroshot(
        oracle, tokenizer, instances.records, instances.class_names, batch_size=3, progress=False
    )
    assert metrics["num_images"] == 2 and metrics["num_skipped_images"] == 2
    assert sorted(Path(s["image"]).name for s in metrics["skipped_images"]) == ["000000000003.jpg", "000000000004.jpg"]
    result = metrics["region_classification"]
    assert result["num_regions"] == 4 and result["num_classes"] == 2
    assert result["accuracy"] == 0.75
    assert result["mean_class_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert result["per_class"]["cat"] == {"accuracy": pytest.approx(2 / 3), "count": 3}
    assert metrics["num_candidate_classes"] == 3
    json.dumps(metrics)


def test_lvis_names_paths_and_template_ensemble(tiny_cloc, lvis):
    path, root = lvis
    records, report = convert_lvis(path, images_dir=root)
    assert [r.id for r in records] == ["lvis-1", "lvis-2"] and report.source == "lvis"
    assert records[1].image == f"{root.as_posix()}/train2017/000000000002.jpg"
    assert (
        convert_main(["lvis", "--annotations", str(path), "--images-dir", str(root), "--out", str(root / "l.jsonl")])
        == 0
    )
    assert [r.regions[0].category for r in read_region_text(root / "l.jsonl")] == ["aerosol can", "aerosol can"]
    instances = load_instance_set(path, root, kind="lvis")
    assert instances.class_names == ["aerosol can", "bow (weapon)", "zebra"]
    tokenizer = VocabTokenizer()
    oracle = Oracle(tiny_cloc.config, tokenizer, ENSEMBLE_TEMPLATES[2], "aerosol can", "bow (weapon)", {})
    metrics = evaluate_region_zeroshot(
        oracle, tokenizer, instances.records, instances.class_names, templates=ENSEMBLE_TEMPLATES, progress=False
    )
    assert metrics["num_skipped_images"] == 0
    assert metrics["region_classification"]["accuracy"] == 0.75
    assert metrics["region_classification"]["mean_class_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["settings"]["templates"] == list(ENSEMBLE_TEMPLATES)


# ----- image classification ---------------------------------------------------------------------------------------


def test_folder_classification_exact_scores(tiny_cloc, folder):
    dataset = load_image_folder(folder)
    assert dataset.class_names == ["cat", "frog", "golden retriever"]
    assert len(dataset.paths) == 7  # the .txt is not an image; the corrupt .png is
    tokenizer = VocabTokenizer()
    colours = {0: "cat", 1: "frog", 2: "golden retriever"}
    oracle = Oracle(tiny_cloc.config, tokenizer, "a photo of a {}.", "x", "y", colours)
    metrics = evaluate_image_zeroshot(oracle, tokenizer, dataset, batch_size=4, ks=(1, 2, 5), progress=False)
    assert metrics["num_images"] == 6 and metrics["num_skipped_images"] == 1
    assert metrics["skipped_images"][0]["image"].endswith("broken.png")
    result = metrics["classification"]
    assert result["top1"] == pytest.approx(5 / 6)  # the blue cat is called a golden retriever
    assert result["top5"] == 1.0
    assert result["mean_class_accuracy"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    # The second-best class of the blue cat is a tie of zero-similarity classes: top2 is 5/6 or 1.
    assert result["top2"] in (pytest.approx(5 / 6), 1.0)


def test_folder_class_names_from_mappings(tmp_path):
    root = tmp_path / "wnids"
    for wnid in ("n01440764", "n01443537"):
        _image(root / wnid / "a.png", (8, 8))
    with pytest.raises(ValueError, match="WordNet ids"):
        load_image_folder(root)
    txt = tmp_path / "map.txt"
    txt.write_text("n01443537 goldfish\nn01440764 tench\n")
    assert load_image_folder(root, txt).class_names == ["tench", "goldfish"]
    plain = tmp_path / "names.txt"
    plain.write_text("tench\ngreat white shark\n")  # one name per line, sorted-folder order
    assert load_image_folder(root, plain).class_names == ["tench", "great white shark"]
    keras = tmp_path / "imagenet_class_index.json"
    keras.write_text(json.dumps({"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"]}))
    assert load_image_folder(root, keras).class_names == ["tench", "goldfish"]
    synonyms = tmp_path / "synonyms.json"
    synonyms.write_text(json.dumps({"n01440764": ["tench", "Tinca tinca"], "n01443537": ["goldfish", "Carassius"]}))
    assert load_image_folder(root, synonyms).class_names == ["tench", "goldfish"]
    (tmp_path / "short.txt").write_text("tench\n")
    with pytest.raises(ValueError, match="1 class names for 2"):
        load_image_folder(root, tmp_path / "short.txt")


# ----- command line -------------------------------------------------------------------------------------------------


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


@pytest.fixture()
def model_dir(tiny_cloc, caption_tokenizer, tmp_path) -> Path:
    path = tmp_path / "model"
    tiny_cloc.save_pretrained(path)
    caption_tokenizer.save_pretrained(path)
    return path


def test_cli_coco_lvis_and_folder(model_dir, coco, lvis, folder, tmp_path, capsys):
    common = ["--model", str(model_dir), "--no-progress", "--device", "cpu", "--batch-size", "2"]
    out = tmp_path / "out"
    coco_args = ["encoder-zeroshot", "coco", "--instances", str(coco[0]), "--images", str(coco[1])]
    assert _run([*coco_args, *common, "--out", str(out / "coco")]) == 0
    metrics = json.loads((out / "coco" / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and metrics["num_skipped_images"] == 2
    assert metrics["region_classification"]["num_regions"] == 4 and metrics["conversion"]["skipped"]["crowd_box"] == 1
    assert 0.0 <= metrics["region_classification"]["mean_class_accuracy"] <= 1.0
    assert metrics["settings"]["templates"] == ["{}"] and metrics["run"]["task"] == "coco"
    printed = capsys.readouterr().out
    assert "region mAcc" in printed and "skipped" in printed

    lvis_args = ["encoder-zeroshot", "lvis", "--instances", str(lvis[0]), "--images", str(lvis[1]), "--ensemble"]
    assert _run(lvis_args + common + ["--out", str(out / "lvis")]) == 0
    metrics = json.loads((out / "lvis" / "metrics.json").read_text())
    assert metrics["num_candidate_classes"] == 3 and len(metrics["settings"]["templates"]) == 7

    folder_args = ["encoder-zeroshot", "folder", "--folder", str(folder), "--template", "a {}.", "--template", "{}"]
    assert _run(folder_args + common + ["--out", str(out / "folder")]) == 0
    metrics = json.loads((out / "folder" / "metrics.json").read_text())
    assert metrics["num_images"] == 6 and metrics["num_skipped_images"] == 1
    assert metrics["classification"]["top1"] <= metrics["classification"]["top5"] == 1.0  # 3 classes
    assert "top5 accuracy" in capsys.readouterr().out


def test_cli_failures_exit_non_zero(model_dir, coco, tmp_path, capsys):
    common = ["--model", str(model_dir), "--no-progress", "--device", "cpu", "--out", str(tmp_path / "out")]
    # No readable image at all: 1, metrics still written.
    instances = json.loads(coco[0].read_text())
    instances["images"] = [image for image in instances["images"] if image["id"] in (3, 4)]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(instances))
    assert _run(["encoder-zeroshot", "coco", "--instances", str(broken), "--images", str(coco[1]), *common]) == 1
    assert (tmp_path / "out" / "metrics.json").is_file()
    # Missing files, bad templates, missing model: 2.
    assert _run(["encoder-zeroshot", "coco", "--instances", str(tmp_path / "nope.json"), "--images", "x", *common]) == 2
    bad = ["encoder-zeroshot", "coco", "--instances", str(coco[0]), "--images", str(coco[1]), "--template", "x"]
    assert _run(bad + common) == 2
    assert "exactly one" in capsys.readouterr().err
    no_model = ["encoder-zeroshot", "folder", "--folder", str(tmp_path), "--model", str(tmp_path / "none")]
    assert _run([*no_model, "--out", str(tmp_path / "o")]) == 2


def test_registered_in_python_m_eval():
    from eval.cli import build_parser

    args = build_parser().parse_args(["encoder-zeroshot", "folder", "--folder", "f", "--model", "m", "--out", "o"])
    assert args.zeroshot_kind == "folder" and args.run.__name__ == "run_zeroshot"
