"""Encoder evaluation on a tiny model and a small synthetic world (``eval.encoder.evaluate``, ``python -m eval``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from cloc_encoder.data.format import RegionTextRecord, read_region_text, write_region_text
from cloc_encoder.data.synthetic import SyntheticWorldConfig, generate_world
from cloc_encoder.image_processing import CLOCImageProcessor
from cloc_encoder.modeling_cloc import CLOCImageState, CLOCTextOutput
from eval.cli import main
from eval.encoder.evaluate import evaluate_encoder, format_encoder_metrics, region_texts

NUM_IMAGES = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """16 test images of 32 px (tiny_cloc's image size); returns the JSONL path."""
    out = tmp_path_factory.mktemp("world")
    return generate_world(SyntheticWorldConfig(image_size=32), out, {"test": NUM_IMAGES})["test"]


def _scores(metrics: dict) -> list[float]:
    values = [metrics["region_classification"][k] for k in ("accuracy", "mean_class_accuracy")]
    for key, item in (("region_text_retrieval", "region"), ("image_text_retrieval", "image")):
        for direction in (f"{item}_to_text", f"text_to_{item}"):
            values += [metrics[key][direction]["R@1"], metrics[key][direction]["R@10"]]
    return [*values, metrics["grounding"]["acc@0.5"], metrics["grounding"]["miou"]]


def test_metric_keys_counts_and_ranges(tiny_cloc, caption_tokenizer, world):
    records = read_region_text(world)
    metrics = evaluate_encoder(tiny_cloc, caption_tokenizer, records, batch_size=5, progress=False)
    regions = [region for record in records for region in record.regions]
    assert metrics["num_images"] == NUM_IMAGES and metrics["num_skipped_images"] == 0
    assert metrics["num_regions"] == len(regions)
    classification = metrics["region_classification"]
    assert classification["num_regions"] == len(regions)
    assert set(classification["per_class"]) == {region.category for region in regions}
    assert metrics["region_text_retrieval"]["region_to_text"]["num_queries"] == len(regions)
    distinct_texts = {text for region in regions for text in region_texts(region)}
    assert metrics["region_text_retrieval"]["text_to_region"]["num_queries"] == len(distinct_texts)
    assert metrics["image_text_retrieval"]["num_images"] == NUM_IMAGES
    assert metrics["grounding"]["num_boxes"] == sum(len(region_texts(region)) for region in regions)
    assert all(0.0 <= value <= 1.0 for value in _scores(metrics))
    for key, item in (("region_text_retrieval", "region"), ("image_text_retrieval", "image")):
        for direction in (f"{item}_to_text", f"text_to_{item}"):
            assert metrics[key][direction]["R@1"] <= metrics[key][direction]["R@10"]
    json.dumps(metrics)  # JSON-ready
    assert "region classification" in format_encoder_metrics(metrics)


def test_results_do_not_depend_on_batch_size_or_training_mode(tiny_cloc, caption_tokenizer, world):
    records = read_region_text(world)
    one_batch = evaluate_encoder(tiny_cloc, caption_tokenizer, records, batch_size=NUM_IMAGES, progress=False)
    tiny_cloc.train()  # as when called from a training loop
    small_batches = evaluate_encoder(tiny_cloc, caption_tokenizer, records, batch_size=3, progress=False)
    assert tiny_cloc.training  # the caller's mode is restored
    assert _scores(one_batch) == pytest.approx(_scores(small_batches), abs=1e-6)


def test_missing_and_corrupt_images_are_skipped_and_counted(tiny_cloc, caption_tokenizer, world, tmp_path):
    copy = tmp_path / "world"
    shutil.copytree(world.parent, copy)
    records = read_region_text(copy / world.name)
    records[2].image_path.write_bytes(b"this is not a PNG")
    records[5].image_path.unlink()
    metrics = evaluate_encoder(tiny_cloc, caption_tokenizer, records, batch_size=4, progress=False)
    assert metrics["num_images"] == NUM_IMAGES - 2 and metrics["num_skipped_images"] == 2
    assert [entry["id"] for entry in metrics["skipped_images"]] == [records[2].id, records[5].id]
    kept_regions = sum(len(r.regions) for i, r in enumerate(records) if i not in (2, 5))
    assert metrics["num_regions"] == kept_regions
    assert metrics["image_text_retrieval"]["num_images"] == NUM_IMAGES - 2


def test_cli_round_trip(tiny_cloc, caption_tokenizer, world, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_cloc.save_pretrained(model_dir)
    caption_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    argv = ["encoder", "--model", str(model_dir), "--data", str(world), "--out", str(out), "--no-progress"]
    assert main([*argv, "--batch-size", "8", "--limit", "6", "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 6 and metrics["run"]["limit"] == 6
    assert 0.0 <= metrics["region_classification"]["accuracy"] <= 1.0
    printed = capsys.readouterr().out
    assert "region classification" in printed and "text -> box" in printed
    # Failures exit non-zero: a missing model folder (2), and no readable image at all (1).
    assert main(["encoder", "--model", str(tmp_path / "nope"), "--data", str(world), "--out", str(out)]) == 2
    broken = tmp_path / "broken.jsonl"
    records = read_region_text(world)[:2]
    for record in records:
        record.image = str(tmp_path / "missing" / Path(record.image).name)
    write_region_text(records, broken)
    assert main(["encoder", "--model", str(model_dir), "--data", str(broken), "--out", str(out), "--no-progress"]) == 1


def test_cli_needs_a_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


# --- an oracle encoder that knows the answers: every metric must come out perfect ---------------------------------


class VocabTokenizer:
    """Stand-in tokenizer: each distinct string gets one id (in the first position), so the oracle reads texts."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def id(self, text: str) -> int:
        return self.ids.setdefault(text, len(self.ids))

    def __call__(self, texts, *, max_length, **_):
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        ids[:, 0] = torch.tensor([self.id(text) for text in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class OracleEncoder(nn.Module):
    """Duck-types :class:`CLOCModel` with embeddings built from the records themselves.

    A text is a one-hot vector; an image is its caption's vector; a region is the normalised sum of its texts'
    vectors plus its class prompt's vector; a text prompt predicts the (model-frame) box of the region carrying
    it. Images are recognised by their exact pixels, regions by their model-frame boxes.
    """

    size = 512

    def __init__(self, config, records: list[RegionTextRecord], tokenizer: VocabTokenizer, class_prompt: str):
        super().__init__()
        self.config = config
        self.anchor = nn.Parameter(torch.zeros(1))  # device and dtype for the evaluator
        self.records, self.tokenizer, self.class_prompt = records, tokenizer, class_prompt
        processor = CLOCImageProcessor.for_model(config)
        self.transforms, self.by_pixels = [], {}
        for index, record in enumerate(records):
            with Image.open(record.image_path) as image:
                pixels, transform = processor.to_model_pixels(image)
            self.transforms.append(transform)
            self.by_pixels[pixels.numpy().tobytes()] = index

    def _vector(self, texts: list[str]) -> torch.Tensor:
        vector = torch.zeros(self.size)
        vector[[self.tokenizer.id(text) for text in texts]] = 1.0
        return vector

    def encode_images(self, pixel_values: torch.Tensor) -> CLOCImageState:
        found = [self.by_pixels[pixels.numpy().tobytes()] for pixels in pixel_values]
        return CLOCImageState(
            patch_tokens=torch.tensor(found, dtype=torch.float32).view(-1, 1, 1),  # the record index
            image_embeds=torch.stack([self._vector([self.records[i].caption]) for i in found]),
        )

    def _record(self, state: CLOCImageState, image: torch.Tensor) -> int:
        return int(state.patch_tokens[int(image), 0, 0])

    def region_embeddings(self, state, boxes, image_index):
        embeds = []
        for box, image in zip(boxes, image_index, strict=True):
            index = self._record(state, image)
            regions = self.records[index].regions
            model_boxes = self.transforms[index].boxes_to_model([region.box for region in regions])
            region = regions[int((model_boxes - box).abs().sum(dim=1).argmin())]
            texts = F.normalize(self._vector(region_texts(region)), dim=0)
            embeds.append(texts + self._vector([self.class_prompt.format(region.category)]))
        return torch.stack(embeds)

    def encode_text(self, input_ids, attention_mask=None) -> CLOCTextOutput:
        embeds = F.one_hot(input_ids[:, 0], self.size).float()
        return CLOCTextOutput(text_embeds=embeds, pooled=embeds)

    def predict_boxes(self, state, text_vectors, image_index):
        boxes = []
        for vector, image in zip(text_vectors, image_index, strict=True):
            index = self._record(state, image)
            text_id = int(vector.argmax())
            region = next(r for r in self.records[index].regions if text_id in map(self.tokenizer.id, region_texts(r)))
            boxes.append(self.transforms[index].boxes_to_model([region.box])[0])
        return torch.stack(boxes)


def _widen(records: list[RegionTextRecord], out: Path, pad: int = 16) -> list[RegionTextRecord]:
    """Pad each square image on the left so images are not square (boxes mapped to the new frame)."""
    widened = []
    for record in records:
        with Image.open(record.image_path) as image:
            canvas = Image.new("RGB", (image.width + pad, image.height), (255, 255, 255))
            canvas.paste(image, (pad, 0))
        path = out / Path(record.image).name
        canvas.save(path)
        width = record.width + pad
        for region in record.regions:
            x1, y1, x2, y2 = region.box
            region.box = [(x1 * record.width + pad) / width, y1, (x2 * record.width + pad) / width, y2]
        record.image, record.width, record.root = str(path), width, None
        widened.append(record)
    return widened


def test_oracle_encoder_scores_perfectly_on_non_square_images(tiny_cloc, tmp_path):
    world = generate_world(SyntheticWorldConfig(image_size=32, duplicate_probability=0.0), tmp_path, {"test": 10})
    records = _widen(read_region_text(world["test"]), tmp_path)
    tokenizer, prompt = VocabTokenizer(), "class: {}"
    oracle = OracleEncoder(tiny_cloc.config, records, tokenizer, prompt)
    metrics = evaluate_encoder(oracle, tokenizer, records, batch_size=3, class_prompt=prompt, progress=False)
    assert metrics["num_images"] == 10
    assert metrics["region_classification"]["accuracy"] == 1.0
    assert metrics["region_classification"]["mean_class_accuracy"] == 1.0
    for key, item in (("region_text_retrieval", "region"), ("image_text_retrieval", "image")):
        assert metrics[key][f"{item}_to_text"]["R@1"] == 1.0
        assert metrics[key][f"text_to_{item}"]["R@1"] == 1.0
    # Boxes went into the model frame and back to the original frame (not the padded square).
    assert metrics["grounding"]["acc@0.5"] == 1.0
    assert metrics["grounding"]["miou"] == pytest.approx(1.0, abs=1e-4)
