"""VESL region pseudo-labelling: phrase rules, OWLv2 box mapping, shards that CLOC pretraining reads, exact resume,
skipped inputs, the command line and the Ray runner (tiny random models built offline)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from cloc_encoder.data.format import read_region_text, write_region_text
from cloc_encoder.vesl import VESLConfig, VESLConfigError
from cloc_encoder.vesl.__main__ import build_parser, main
from cloc_encoder.vesl.captioner import HFCaptioner
from cloc_encoder.vesl.detector import OwlDetector, padded_square_to_original, select_detections
from cloc_encoder.vesl.phrases import (
    OWLV2_GENERIC_WORDS,
    PhraseExtractor,
    TaggerUnavailableError,
    nltk_perceptron_tagger,
)
from cloc_encoder.vesl.pipeline import plan_run, run_vesl
from tests.tiny_vesl import (
    OWL_IMAGE_SIZE,
    build_tiny_blip,
    build_tiny_owlv2,
    lexicon_tagger,
    subprocess_env,
    write_perceptron_tagger,
)

REPO = Path(__file__).resolve().parents[1]
THRESHOLD = 0.05  # the tiny random OWLv2 gives a few boxes above it per image


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny models and 14 inputs: 10 synthetic-world images (2 without a caption), a non-square image, a truncated
    PNG, a text file named .png and a missing file."""
    from cloc_encoder.data.synthetic import SyntheticWorldConfig, generate_world

    root = tmp_path_factory.mktemp("vesl")
    world = root / "world"
    generate_world(SyntheticWorldConfig(image_size=32), world, {"train": 10})
    records = read_region_text(world / "train.jsonl")
    records[3].caption = records[7].caption = ""
    Image.new("RGB", (48, 24), (200, 30, 30)).save(world / "wide.png")
    (world / "truncated.png").write_bytes((world / "images/train/syn-train-000000.png").read_bytes()[:60])
    (world / "text.png").write_text("not an image")
    extra = [("wide", "wide.png", "a red square on the left"), ("truncated", "truncated.png", "a red circle")]
    extra += [("text", "text.png", "a blue square"), ("missing", "missing.png", "a green triangle")]
    for key, image, caption in extra:
        records.append(replace(records[0], id=key, image=image, caption=caption, width=8, height=8))
    write_region_text(records, world / "inputs.jsonl")
    return SimpleNamespace(
        root=root,
        inputs=world / "inputs.jsonl",
        owl=build_tiny_owlv2(root / "owl"),
        blip=build_tiny_blip(root / "blip"),
        extractor=PhraseExtractor(tagger=lexicon_tagger()),
    )


def make_config(env, out: Path, **values) -> VESLConfig:
    settings = dict(
        out=str(out),
        detector=str(env.owl),
        records=str(env.inputs),
        captioner=str(env.blip),
        recaption=False,
        caption_max_new_tokens=8,
        detector_image_size=OWL_IMAGE_SIZE,
        box_threshold=THRESHOLD,
        shard_size=4,
        batch_size=3,
        device="cpu",
        progress=False,
    )
    settings.update(values)
    return VESLConfig(**settings)


@pytest.fixture(scope="module")
def straight(env):
    """An uninterrupted single-machine run."""
    out = env.root / "straight"
    summary = run_vesl(make_config(env, out), extractor=env.extractor)
    return SimpleNamespace(out=out, summary=summary)


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*"))}


# ----- phrases ------------------------------------------------------------------------------------------------------


def test_phrase_extraction_follows_the_paper():
    extractor = PhraseExtractor(tagger=lexicon_tagger())
    caption = (
        "Stock photo: A small red circle, a large blue square and THE green triangle above a small red circle. PNG"
    )
    assert extractor(caption) == ["a small red circle", "a large blue square", "the green triangle"]
    assert {"stock", "photo", "png", "image", "wallpaper"} <= OWLV2_GENERIC_WORDS
    assert extractor("this and a shapes") == ["a shapes"]  # a determiner alone is not a noun phrase
    only_stopwords = PhraseExtractor(tagger=lambda tokens: [(t, "NN" if t.isalnum() else t) for t in tokens])
    assert only_stopwords("the it, blue") == ["blue"]  # chunks made only of stopwords ("the it") are skipped
    assert PhraseExtractor(tagger=lexicon_tagger(), max_phrases=2)(caption) == [
        "a small red circle",
        "a large blue square",
    ]
    assert extractor("image photo wallpaper") == []


def test_missing_tagger_data_says_how_to_install_it():
    with pytest.raises(TaggerUnavailableError, match=r"python -m nltk.downloader averaged_perceptron_tagger_zz"):
        nltk_perceptron_tagger(lang="zz")


# ----- detector -----------------------------------------------------------------------------------------------------


def test_owlv2_boxes_map_from_the_padded_square_to_the_original_image():
    from transformers import Owlv2ImageProcessor

    # A 200x100 image is padded (bottom) to 200x200: a box at x 50..100, y 25..75 px is cxcywh
    # (0.375, 0.25, 0.25, 0.25) in the square and [0.25, 0.25, 0.5, 0.75] of the original image.
    boxes = torch.tensor([[0.375, 0.25, 0.25, 0.25], [0.5, 0.9, 0.2, 0.1]])
    mapped = padded_square_to_original(boxes, 200, 100)
    assert torch.allclose(mapped[0], torch.tensor([0.25, 0.25, 0.5, 0.75]))
    assert torch.allclose(mapped[1], torch.tensor([0.4, 1.0, 0.6, 1.0]))  # in the padding: clipped to nothing
    # transformers' post-processing with target_sizes=(H, W) gives the same pixels.
    processor = Owlv2ImageProcessor(size={"height": 32, "width": 32})
    outputs = SimpleNamespace(logits=torch.zeros(1, 2, 1), pred_boxes=boxes[None])
    pixels = processor.post_process_object_detection(outputs, threshold=-1.0, target_sizes=[(100, 200)])[0]["boxes"]
    assert torch.allclose((pixels / torch.tensor([200, 100, 200, 100]))[0], mapped[0])
    # and the processor pads at the bottom: the lower half of a 32x16 image's input is the constant padding.
    image = Image.new("RGB", (32, 16), (255, 255, 255))
    values = processor(image, return_tensors="pt", do_normalize=False)["pixel_values"][0]
    assert values[:, :14].min() > 0.9 and values[:, 18:].max() < 0.1


def test_select_detections_keeps_confident_boxes_with_their_best_phrase():
    logits = torch.tensor([[2.0, -1.0, 9.0], [-1.0, 0.5, 9.0], [-5.0, -4.0, 9.0], [1.0, 3.0, 9.0]])
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.31, 0.3, 0.2, 0.2], [0.5, 0.5, 0.5, 0.5], [0.5, 0.95, 0.2, 0.05]])
    found = select_detections(logits, boxes, ["dog", "cat"], 100, 50, threshold=0.1)  # query 3 is padding
    assert [(d.phrase, round(d.score, 3)) for d in found] == [("dog", 0.881), ("cat", 0.622)]  # box 3: in the padding
    assert all(d.score > 0.1 for d in found) and found[0].box == pytest.approx((0.2, 0.4, 0.4, 0.8))
    assert len(select_detections(logits, boxes, ["dog", "cat"], 100, 50, threshold=0.1, nms_iou=0.5)) == 1
    assert len(select_detections(logits, boxes, ["dog", "cat"], 100, 50, threshold=0.0, max_regions=1)) == 1
    assert select_detections(logits, boxes, ["dog", "cat"], 100, 50, threshold=0.9) == []
    assert select_detections(logits, boxes, [], 100, 50) == []


def test_owl_detector_thresholds_and_is_deterministic(env):
    images = [Image.new("RGB", (64, 40), (20, 200, 20)), Image.new("RGB", (30, 60), (200, 20, 20))]
    phrases = [["a green square", "a red circle"], ["a red circle"]]
    detector = OwlDetector(env.owl, image_size=OWL_IMAGE_SIZE, threshold=0.0)
    everything = detector(images, phrases)
    assert everything == detector(images, phrases)
    assert all(1 <= len(found) <= 16 for found in everything)  # 16 patches → at most 16 boxes
    detector.threshold = THRESHOLD
    kept = detector(images, phrases)
    for all_found, some in zip(everything, kept, strict=True):
        assert [d for d in all_found if d.score > THRESHOLD] == some
    for found, image_phrases in zip(everything, phrases, strict=True):
        for d in found:
            assert d.phrase in image_phrases and 0 <= d.box[0] < d.box[2] <= 1 and 0 <= d.box[1] < d.box[3] <= 1
    assert detector(images, [[], []]) == [[], []]
    smaller = OwlDetector(env.owl, image_size=32, threshold=0.0)  # not the checkpoint's size: positions interpolated
    assert smaller.interpolate and all(1 <= len(found) <= 4 for found in smaller(images, phrases))  # 2x2 patches


def test_captioner_is_deterministic(env):
    captioner = HFCaptioner(env.blip, max_new_tokens=6)
    images = [Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (30, 40), (0, 0, 255))]
    captions = captioner(images)
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)
    assert captioner(images) == captions and captioner(images[1:]) == captions[1:]


# ----- pipeline -----------------------------------------------------------------------------------------------------


def test_shards_manifests_summary_and_skipped_inputs(env, straight):
    out, summary = straight.out, straight.summary
    assert sorted(p.name for p in out.glob("shard-*")) == [
        f"shard-0000{k}{suffix}" for k in range(4) for suffix in (".jsonl", ".manifest.json")
    ]
    records = read_region_text(out, strict=True)
    assert [r.id for r in records] == [f"syn-train-{i:06d}" for i in range(10)] + ["wide"]
    assert summary["images"] == 14 and summary["records"] == 11 and summary["skipped"] == 3
    assert summary["skipped_by_reason"] == {"missing image": 1, "unreadable image": 2}
    assert json.loads((out / "summary.json").read_text())["skipped"] == 3
    manifest = json.loads((out / "shard-00003.manifest.json").read_text())
    assert manifest["inputs"] == ["text", "missing"] and [s["id"] for s in manifest["skipped"]] == ["text", "missing"]
    assert summary["regions"] == sum(len(r.regions) for r in records) > 0
    inputs = {r.id: r for r in read_region_text(env.inputs)}
    captioned = HFCaptioner(env.blip, max_new_tokens=8)([Image.open(records[3].image_path)])[0]
    for record in records:
        assert record.image_path.is_file() and Image.open(record.image_path).size == (record.width, record.height)
        assert record.caption == (inputs[record.id].caption or captioned)
        phrases = env.extractor(record.caption)
        assert all(region.caption in phrases and region.attributes["score"] > THRESHOLD for region in record.regions)
    assert records[-1].width == 48 and records[-1].height == 24


def test_records_without_captions_are_skipped_without_a_captioner(env, tmp_path):
    summary = run_vesl(make_config(env, tmp_path / "out", captioner=None, max_shards=1), extractor=env.extractor)
    assert summary["records"] == 3 and summary["skipped_by_reason"] == {"no caption": 1}  # record 3 has none
    assert summary["skipped_examples"][0]["id"] == "syn-train-000003"


def test_resume_after_a_kill_is_byte_identical(env, straight):
    out = env.root / "resumed"
    first = run_vesl(make_config(env, out, max_shards=1), extractor=env.extractor)
    assert first["shards_done"] == 1 and sorted(shard_files(out)) == ["shard-00000.jsonl", "shard-00000.manifest.json"]
    # What a kill leaves behind: a temporary file, a shard written without its manifest, a truncated manifest.
    (out / "tmpabc.tmp").write_text("half")
    (out / "shard-00002.jsonl").write_text('{"id": "half"}\n')
    (out / "shard-00001.manifest.json").write_text('{"shard": 1, "inp')
    assert plan_run(make_config(env, out)).pending == [1, 2, 3]
    resumed = run_vesl(make_config(env, out, batch_size=2), extractor=env.extractor)  # batch size may change
    assert not list(out.glob("*.tmp"))
    assert shard_files(out) == shard_files(straight.out)
    assert {k: v for k, v in resumed.items() if k != "elapsed_s"} == {
        k: v for k, v in straight.summary.items() if k != "elapsed_s"
    }
    assert plan_run(make_config(env, out)).pending == []
    with pytest.raises(VESLConfigError, match="other settings"):
        plan_run(make_config(env, out, box_threshold=0.2))


def test_shards_feed_cloc_pretraining(straight, tmp_path):
    from tests.test_train_cloc import tiny_config
    from train.cloc.pretrain import train_cloc

    shards = str(straight.out)  # the output folder itself is the training data (all shard-*.jsonl)
    config = tiny_config(
        straight.out, tmp_path / "cloc", train_data=shards, max_steps=2, batch_size=4, save_every=0, tensorboard=False
    )
    result = train_cloc(config)
    assert result.step == 2 and math.isfinite(result.metrics["loss"])
    assert result.metrics["region_weight"] > 0  # the shards' region captions reached the region losses


def test_command_line(env, straight, tmp_path):
    nltk_data = write_perceptron_tagger(tmp_path / "nltk_data")
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "cloc_encoder.vesl", "--records", str(env.inputs), "--out", str(out)]
    command += ["--detector", str(env.owl), "--captioner", str(env.blip), "--keep-captions", "--max-new-tokens", "8"]
    command += ["--image-size", str(OWL_IMAGE_SIZE), "--threshold", str(THRESHOLD), "--shard-size", "4"]
    command += ["--batch-size", "3", "--device", "cpu", "--no-progress"]
    result = subprocess.run(
        command, cwd=REPO, env=subprocess_env(NLTK_DATA=str(nltk_data)), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "11 records written" in result.stdout and "unreadable image: 2" in result.stdout
    assert [r.id for r in read_region_text(out)] == [r.id for r in read_region_text(straight.out)]
    help_text = build_parser().format_help()  # the paper's settings are the defaults
    assert "(default: 448)" in help_text and "(default: 0.1)" in help_text and "(default: 20)" in help_text


def test_command_line_without_tagger_data(env, tmp_path, capsys):
    try:
        nltk_perceptron_tagger()
    except TaggerUnavailableError:
        pass
    else:
        pytest.skip("NLTK's tagger data is installed on this machine")
    argv = ["--records", str(env.inputs), "--out", str(tmp_path / "o"), "--detector", str(env.owl), "--no-progress"]
    assert main(argv) == 2
    assert "python -m nltk.downloader averaged_perceptron_tagger_eng" in capsys.readouterr().err
    assert main(["--images", str(tmp_path), "--out", str(tmp_path / "o2"), "--detector", str(env.owl)]) == 2
    assert "captioner" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ray.data's own deprecated settings
def test_ray_runner_matches_a_single_machine(env, straight):
    ray = pytest.importorskip("ray", reason="ray[data] is not installed (pip install -e '.[vesl]')")
    from cloc_encoder.vesl.ray_runner import RayOptions, run_vesl_ray

    out = env.root / "ray"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        options = RayOptions(cpus_per_actor=0.5, cpus_per_phrase_task=0.5)
        summary = run_vesl_ray(make_config(env, out), options, extractor=env.extractor)
    finally:
        ray.shutdown()
    assert shard_files(out) == shard_files(straight.out)
    assert summary["records"] == 11 and summary["skipped_by_reason"] == straight.summary["skipped_by_reason"]


def test_img2dataset_tars_get_regions_into_tar_shards_the_trainer_streams(env, tmp_path):
    """An img2dataset download ({key}.jpg/.txt/.json in tars) → VESL with tar output → shards + sizes.json."""
    import io

    from cloc_encoder.data.shards import expand_shards, iter_shard_records, write_tar_shard
    from train.cloc.streaming import shard_plan

    records = read_region_text(env.inputs)[:6]
    download = tmp_path / "download"
    for index in range(2):
        samples = []
        for position, record in enumerate(records[index * 3 : index * 3 + 3]):
            jpeg = io.BytesIO()
            Image.open(record.image_path).convert("RGB").save(jpeg, format="JPEG")
            key = f"{index:05d}{position:04d}"
            meta = json.dumps({"key": key, "caption": "ignored", "status": "success"}).encode()
            samples.append({"__key__": key, "jpg": jpeg.getvalue(), "txt": record.caption.encode(), "json": meta})
        write_tar_shard(download / f"{index:05d}.tar", samples)
    with pytest.raises(VESLConfigError, match="output_format='tar'"):
        make_config(env, tmp_path / "bad", records=None, webdataset=str(download)).validate()
    config = make_config(env, tmp_path / "out", records=None, webdataset=str(download), output_format="tar")
    summary = run_vesl(config, extractor=env.extractor)
    out = tmp_path / "out"
    assert summary["images"] == 6 and sorted(p.name for p in out.glob("shard-*.tar")) == [
        "shard-00000.tar",
        "shard-00001.tar",
    ]
    assert not list(out.glob("shard-*.jsonl"))
    sizes = json.loads((out / "sizes.json").read_text())
    streamed = list(iter_shard_records(expand_shards(f"{out}/shard-{{00000..00001}}.tar")))
    assert sum(sizes.values()) == summary["records"] == len(streamed) > 0
    assert streamed[0].id == "00000/000000000" and streamed[0].caption == (records[0].caption or streamed[0].caption)
    assert shard_plan(f"{out}/shard-{{00000..00001}}.tar", None, batch_size=1, world_size=1, seed=0).batches_per_epoch
