"""Tests for the COCO / Visual Genome / RefCOCO converters, the restricted unpickler and the convert CLI.

Fixtures are written here, in the real source formats, into ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cloc_encoder.data.convert import main as convert_main
from cloc_encoder.data.converters import (
    ConversionError,
    MissingInputError,
    convert_coco,
    convert_refcoco,
    convert_visual_genome,
    pixel_xywh_to_normalized,
    write_records,
)
from cloc_encoder.data.format import read_region_text
from cloc_encoder.data.safe_pickle import UnsafePickleError, safe_load_pickle

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- fixture builders
def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def coco_instances() -> dict[str, Any]:
    """3 images; a crowd box, an out-of-range box, a degenerate box, a box overflowing by < 1 px, an empty image."""
    return {
        "info": {"description": "fixture"},
        "licenses": [],
        "images": [
            {"id": 1, "file_name": "000000000001.jpg", "width": 640, "height": 480},
            {"id": 2, "file_name": "000000000002.jpg", "width": 200, "height": 100},
            {"id": 3, "file_name": "000000000003.jpg", "width": 100, "height": 100},
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [64, 48, 128, 96], "area": 12288, "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 2, "bbox": [0, 0, 320, 240], "area": 76800, "iscrowd": 1},
            {"id": 13, "image_id": 1, "category_id": 2, "bbox": [600, 400, 40.6, 80.5], "area": 1, "iscrowd": 0},
            {"id": 21, "image_id": 2, "category_id": 1, "bbox": [150, 50, 100, 20], "area": 2000, "iscrowd": 0},
            {"id": 22, "image_id": 2, "category_id": 1, "bbox": [10, 10, 0, 5], "area": 0, "iscrowd": 0},
            {"id": 23, "image_id": 2, "category_id": 2, "bbox": [50, 25, 50, 50], "area": 2500, "iscrowd": 0},
        ],
        "categories": [
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 2, "name": "dog", "supercategory": "animal"},
        ],
    }


def coco_captions() -> dict[str, Any]:
    return {
        "images": coco_instances()["images"],
        "annotations": [
            {"id": 1, "image_id": 1, "caption": "A person next to a dog. "},
            {"id": 2, "image_id": 2, "caption": "Two dogs."},
            {"id": 3, "image_id": 1, "caption": "Second caption of image one."},
            {"id": 4, "image_id": 3, "caption": "An empty street."},
        ],
    }


def vg_files(folder: Path) -> tuple[Path, Path]:
    image_data = [
        {"image_id": 1, "width": 800, "height": 600, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg",
         "coco_id": None, "flickr_id": None},
        {"id": 2, "width": 100, "height": 50, "url": "https://cs.stanford.edu/people/rak248/VG_100K/2.jpg",
         "coco_id": 9, "flickr_id": None},
    ]  # fmt: skip
    region = {"region_id": 11, "image_id": 1, "phrase": "the clock is green", "x": 80, "y": 60, "width": 160,
              "height": 120}  # fmt: skip
    region_descriptions = [
        {
            "id": 1,
            "regions": [
                region,
                {**region, "region_id": 12, "phrase": "The clock is green "},  # duplicate
                {**region, "region_id": 13, "phrase": "   "},  # empty phrase
                {**region, "region_id": 14, "phrase": "far right", "x": 790, "width": 50},  # out of range
                {**region, "region_id": 15, "phrase": "corner", "x": -0.5, "y": 0, "width": 10.5, "height": 6},
            ],
        },
        {
            "id": 2,
            "regions": [
                {"region_id": 21, "image_id": 2, "phrase": "a cat", "x": 25, "y": 0, "width": 50, "height": 50}
            ],
        },
        {"id": 3, "regions": [{**region, "region_id": 31, "image_id": 3}]},  # not in image_data
    ]
    return write_json(folder / "region_descriptions.json", region_descriptions), write_json(
        folder / "image_data.json", image_data
    )


def refer_refs() -> list[dict[str, Any]]:
    """Refs in the refer toolkit's schema."""

    def ref(ref_id: int, ann_id: int, image_id: int, split: str, sents: list[str], category_id: int = 1) -> dict:
        return {
            "sent_ids": [ref_id * 10 + k for k in range(len(sents))],
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
            "ann_id": ann_id,
            "ref_id": ref_id,
            "image_id": image_id,
            "split": split,
            "sentences": [
                {"tokens": s.split(), "raw": s.capitalize() + " café", "sent_id": ref_id * 10 + k, "sent": s}
                for k, s in enumerate(sents)
            ],
            "category_id": category_id,
        }

    return [
        ref(2, 102, 1, "val", ["dog on the right"], category_id=2),
        ref(1, 101, 1, "val", ["man on left", "guy in red"]),
        ref(3, 103, 2, "testA", ["left person"]),
        ref(4, 104, 2, "val", ["outside"]),
        ref(5, 999, 2, "val", ["no such annotation"]),
        ref(6, 103, 2, "val", []),
    ]


def refer_instances() -> dict[str, Any]:
    return {
        "images": [
            {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 640, "height": 480},
            {"id": 2, "width": 200, "height": 100},  # no file_name: the COCO_train2014 pattern is used
        ],
        "annotations": [
            {"id": 101, "image_id": 1, "category_id": 1, "bbox": [64, 48, 128, 96], "iscrowd": 0, "area": 1.0},
            {"id": 102, "image_id": 1, "category_id": 2, "bbox": [320, 240, 320, 240], "iscrowd": 0, "area": 1.0},
            {"id": 103, "image_id": 2, "category_id": 1, "bbox": [0, 0, 100, 50], "iscrowd": 0, "area": 1.0},
            {"id": 104, "image_id": 2, "category_id": 1, "bbox": [300, 0, 10, 10], "iscrowd": 0, "area": 1.0},
        ],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 2, "name": "dog"}],
    }


def py2_pickle(obj: Any) -> bytes:
    """Pickle plain data the way Python 2 wrote it: ``str`` as byte strings (SHORT_BINSTRING/BINSTRING)."""
    out = bytearray(b"\x80\x02")

    def emit(value: Any) -> None:
        if isinstance(value, dict):
            out.extend(b"}(")
            for key, item in value.items():
                emit(key)
                emit(item)
            out.extend(b"u")
        elif isinstance(value, list):
            out.extend(b"](")
            for item in value:
                emit(item)
            out.extend(b"e")
        elif isinstance(value, str):
            data = value.encode("utf-8")
            out.extend((b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<i", len(data))) + data)
        elif isinstance(value, bool):
            out.extend(b"\x88" if value else b"\x89")
        elif isinstance(value, int):
            out.extend(b"J" + struct.pack("<i", value))
        else:
            raise TypeError(value)

    emit(obj)
    out.extend(b".")
    return bytes(out)


def make_refer(root: Path, *, py2: bool = False) -> Path:
    folder = root / "refcoco"
    folder.mkdir(parents=True, exist_ok=True)
    refs_path = folder / "refs(unc).p"
    if py2:
        refs_path.write_bytes(py2_pickle(refer_refs()))
    else:
        with open(refs_path, "wb") as handle:
            pickle.dump(refer_refs(), handle, protocol=2)
    write_json(folder / "instances.json", refer_instances())
    return root


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "cloc_encoder.data.convert", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# ----------------------------------------------------------------------------------------------- box helper
def test_pixel_box_conversion_and_reasons() -> None:
    assert pixel_xywh_to_normalized([64, 48, 128, 96], 640, 480) == ([0.1, 0.1, 0.3, 0.3], "")
    assert pixel_xywh_to_normalized([-0.9, 0, 10, 10], 100, 100) == ([0.0, 0.0, 0.091, 0.1], "")
    assert pixel_xywh_to_normalized([-1.5, 0, 10, 10], 100, 100) == (None, "out_of_range_box")
    assert pixel_xywh_to_normalized([0, 0, 0, 10], 100, 100) == (None, "degenerate_box")
    assert pixel_xywh_to_normalized([0, 0, -3, 10], 100, 100) == (None, "degenerate_box")
    assert pixel_xywh_to_normalized([0, 0, 1e-5, 10], 100, 100) == (None, "degenerate_box")  # collapses at 6 dp
    assert pixel_xywh_to_normalized([0, 0, "1", 10], 100, 100) == (None, "malformed_box")
    assert pixel_xywh_to_normalized([0, 0, float("nan"), 10], 100, 100) == (None, "malformed_box")
    assert pixel_xywh_to_normalized([0, 0, 1], 100, 100) == (None, "malformed_box")


# ----------------------------------------------------------------------------------------------- COCO
def test_coco_conversion_boxes_and_skips(tmp_path: Path) -> None:
    instances = write_json(tmp_path / "instances_val2017.json", coco_instances())
    captions = write_json(tmp_path / "captions_val2017.json", coco_captions())
    records, report = convert_coco(instances, captions_json=captions, images_dir="coco/val2017")
    assert [r.id for r in records] == ["coco-1", "coco-2"]
    one, two = records
    assert (one.image, one.width, one.height, one.source) == ("coco/val2017/000000000001.jpg", 640, 480, "coco")
    assert one.caption == "A person next to a dog."
    assert two.caption == "Two dogs."
    assert [r.box for r in one.regions] == [[0.1, 0.1, 0.3, 0.3], [600 / 640, 400 / 480, 1.0, 1.0]]
    assert [(r.caption, r.category, r.attributes) for r in one.regions] == [
        ("person", "person", {"ann_id": 11}),
        ("dog", "dog", {"ann_id": 13}),
    ]
    assert [r.box for r in two.regions] == [[0.25, 0.25, 0.5, 0.75]]
    assert dict(report.skipped) == {
        "crowd_box": 1,
        "out_of_range_box": 1,
        "degenerate_box": 1,
        "image_without_regions": 1,
    }
    assert (report.records, report.regions) == (2, 3)
    assert "annotations[3]" in "\n".join(report.examples)
    assert "out_of_range_box: 1" in report.summary()


def test_coco_flags(tmp_path: Path) -> None:
    instances = write_json(tmp_path / "instances.json", coco_instances())
    captions = write_json(tmp_path / "captions.json", coco_captions())
    records, report = convert_coco(instances, include_crowd=True, keep_empty=True)
    assert [r.id for r in records] == ["coco-1", "coco-2", "coco-3"]
    assert all(r.caption == "" for r in records)
    crowd = records[0].regions[1]
    assert crowd.box == [0.0, 0.0, 0.5, 0.5] and crowd.attributes == {"ann_id": 12, "iscrowd": 1}
    assert records[2].regions == [] and "crowd_box" not in report.skipped
    records, _ = convert_coco(instances, captions_json=captions, caption_index=1)
    assert [r.caption for r in records] == ["Second caption of image one.", "Two dogs."]
    records, report = convert_coco(instances, captions_json=captions, one_record_per_caption=True)
    assert [(r.id, r.caption) for r in records] == [
        ("coco-1-c0", "A person next to a dog."),
        ("coco-1-c1", "Second caption of image one."),
        ("coco-2-c0", "Two dogs."),
    ]
    assert report.records == 3 and report.regions == 5


def test_coco_check_images_and_relative_paths(tmp_path: Path) -> None:
    instances = write_json(tmp_path / "ann" / "instances.json", coco_instances())
    images = tmp_path / "coco" / "val2017"
    images.mkdir(parents=True)
    (images / "000000000001.jpg").write_bytes(b"jpeg")
    out = tmp_path / "out" / "coco.jsonl"
    records, report = convert_coco(instances, images_dir=images, relative_to=out.parent, check_images=True)
    assert [r.id for r in records] == ["coco-1"]
    assert report.skipped["image_file_missing"] == 1
    assert records[0].image == "../coco/val2017/000000000001.jpg"
    assert write_records(records, out) == 1
    back = read_region_text(out, strict=True)
    assert back[0].image_path.resolve() == (images / "000000000001.jpg").resolve()


def test_coco_output_reads_back_strict(tmp_path: Path) -> None:
    instances = write_json(tmp_path / "instances.json", coco_instances())
    records, _ = convert_coco(instances)
    out = tmp_path / "coco.jsonl"
    write_records(records, out)
    back = read_region_text(out, strict=True)
    assert [r.id for r in back] == ["coco-1", "coco-2"]
    assert back[0].regions[1].box == [0.9375, 0.833333, 1.0, 1.0]
    assert back[1].regions[0].box == [0.25, 0.25, 0.5, 0.75]


def test_coco_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "instances_train2017.json"
    with pytest.raises(MissingInputError, match=r"instances_train2017\.json: file not found; expected a COCO"):
        convert_coco(missing)
    data = coco_instances()
    del data["annotations"]
    path = write_json(tmp_path / "no_ann.json", data)
    with pytest.raises(ConversionError, match=r"no_ann\.json: missing key 'annotations'"):
        convert_coco(path)
    data = coco_instances()
    data["annotations"][2]["bbox"] = "600,400,40,80"
    path = write_json(tmp_path / "bad_bbox.json", data)
    with pytest.raises(ConversionError, match=r"bad_bbox\.json: annotations\[2\]\.bbox must be a list, got str"):
        convert_coco(path)
    data = coco_instances()
    data["images"][1]["width"] = "200"
    path = write_json(tmp_path / "bad_width.json", data)
    with pytest.raises(ConversionError, match=r"images\[1\]\.width must be"):
        convert_coco(path)
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConversionError, match=r"broken\.json: invalid JSON"):
        convert_coco(path)
    path = write_json(tmp_path / "list.json", [])
    with pytest.raises(ConversionError, match=r"list\.json must be an object"):
        convert_coco(path)
    instances = write_json(tmp_path / "instances.json", coco_instances())
    with pytest.raises(MissingInputError, match="expected a COCO captions file"):
        convert_coco(instances, captions_json=tmp_path / "captions.json")


# ----------------------------------------------------------------------------------------------- Visual Genome
def test_visual_genome_conversion(tmp_path: Path) -> None:
    regions_json, image_data_json = vg_files(tmp_path)
    records, report = convert_visual_genome(regions_json, image_data_json, images_dir="vg")
    assert [r.id for r in records] == ["vg-1", "vg-2"]
    one, two = records
    assert (one.image, one.width, one.height, one.caption, one.source) == ("vg/1.jpg", 800, 600, "", "visual_genome")
    assert [(r.caption, r.box, r.category, r.attributes) for r in one.regions] == [
        ("the clock is green", [0.1, 0.1, 0.3, 0.3], None, {"region_id": 11}),
        ("corner", [0.0, 0.0, 10 / 800, 6 / 600], None, {"region_id": 15}),
    ]
    assert (two.image, [r.box for r in two.regions]) == ("vg/2.jpg", [[0.25, 0.0, 0.75, 1.0]])
    assert dict(report.skipped) == {
        "duplicate_region": 1,
        "empty_phrase": 1,
        "out_of_range_box": 1,
        "unknown_image": 1,
    }
    records, report = convert_visual_genome(regions_json, image_data_json, images_dir="vg", layout="url", dedupe=False)
    assert [r.image for r in records] == ["vg/VG_100K_2/1.jpg", "vg/VG_100K/2.jpg"]
    assert len(records[0].regions) == 3 and "duplicate_region" not in report.skipped
    out = tmp_path / "vg.jsonl"
    write_records(records, out)
    assert [len(r.regions) for r in read_region_text(out, strict=True)] == [3, 1]


def test_visual_genome_errors(tmp_path: Path) -> None:
    regions_json, image_data_json = vg_files(tmp_path)
    with pytest.raises(MissingInputError, match=r"image_data_v1\.json: file not found; expected Visual Genome"):
        convert_visual_genome(regions_json, tmp_path / "image_data_v1.json")
    data = json.loads(regions_json.read_text())
    del data[1]["regions"]
    bad = write_json(tmp_path / "bad_regions.json", data)
    with pytest.raises(ConversionError, match=r"bad_regions\.json: \[1\]: missing key 'regions'"):
        convert_visual_genome(bad, image_data_json)
    data = json.loads(regions_json.read_text())
    data[0]["regions"][0]["x"] = "80"
    bad = write_json(tmp_path / "bad_x.json", data)
    with pytest.raises(ConversionError, match=r"bad_x\.json: \[0\]\.regions\[0\]\.x must be"):
        convert_visual_genome(bad, image_data_json)
    bad = write_json(tmp_path / "dict_regions.json", {"regions": []})
    with pytest.raises(ConversionError, match=r"dict_regions\.json must be a list"):
        convert_visual_genome(bad, image_data_json)


# ----------------------------------------------------------------------------------------------- RefCOCO
def test_refcoco_conversion(tmp_path: Path) -> None:
    root = make_refer(tmp_path / "refer")
    records, report = convert_refcoco(root, dataset="refcoco", split_by="unc", split="val", images_dir="coco/train2014")
    assert [r.id for r in records] == ["refcoco-unc-val-1"]
    (record,) = records
    assert (record.image, record.width, record.height, record.source) == (
        "coco/train2014/COCO_train2014_000000000001.jpg",
        640,
        480,
        "refcoco",
    )
    assert [(r.caption, r.category, r.expressions, r.attributes, r.box) for r in record.regions] == [
        ("man on left", "person", ["man on left", "guy in red"], {"ref_id": 1, "ann_id": 101}, [0.1, 0.1, 0.3, 0.3]),
        ("dog on the right", "dog", ["dog on the right"], {"ref_id": 2, "ann_id": 102}, [0.5, 0.5, 1.0, 1.0]),
    ]
    assert dict(report.skipped) == {"out_of_range_box": 1, "unknown_annotation": 1, "ref_without_sentences": 1}
    records, report = convert_refcoco(root, split="testA", images_dir="coco/train2014")
    assert [(r.id, r.image) for r in records] == [
        ("refcoco-unc-testA-2", "coco/train2014/COCO_train2014_000000000002.jpg")
    ]
    assert records[0].regions[0].box == [0.0, 0.0, 0.5, 0.5] and not report.skipped
    out = tmp_path / "refcoco_testA.jsonl"
    write_records(records, out)
    assert read_region_text(out, strict=True)[0].regions[0].expressions == ["left person"]


def test_refcoco_reads_python2_pickle(tmp_path: Path) -> None:
    expected, _ = convert_refcoco(make_refer(tmp_path / "py3"), split="val")
    root = make_refer(tmp_path / "py2", py2=True)
    refs = safe_load_pickle(root / "refcoco" / "refs(unc).p")
    assert refs == refer_refs()  # keys and texts come back as str, UTF-8 decoded
    assert refs[1]["sentences"][0]["raw"] == "Man on left café"
    records, _ = convert_refcoco(root, split="val")
    assert [r.to_json() for r in records] == [r.to_json() for r in expected]


def test_refcoco_errors(tmp_path: Path) -> None:
    root = make_refer(tmp_path / "refer")
    with pytest.raises(
        MissingInputError, match=r"refs\(google\)\.p: file not found.*this folder has \['refs\(unc\)\.p'\]"
    ):
        convert_refcoco(root, split_by="google")
    with pytest.raises(MissingInputError, match=r"refcocog[/\\]refs\(umd\)\.p: file not found"):
        convert_refcoco(root, dataset="refcocog", split_by="umd")
    with pytest.raises(ValueError, match="refcoco\\+ has split_by"):
        convert_refcoco(root, dataset="refcoco+", split_by="umd")
    with pytest.raises(ConversionError, match=r"no refs in split 'testC'; splits present: \['testA', 'val'\]"):
        convert_refcoco(root, split="testC")
    (root / "refcoco" / "instances.json").unlink()
    with pytest.raises(MissingInputError, match=r"instances\.json: file not found; expected the refer toolkit"):
        convert_refcoco(root)
    data = refer_instances()
    del data["categories"]
    write_json(root / "refcoco" / "instances.json", data)
    with pytest.raises(ConversionError, match=r"instances\.json: missing key 'categories'"):
        convert_refcoco(root)
    refs = refer_refs()
    del refs[0]["ann_id"]
    with open(root / "refcoco" / "refs(unc).p", "wb") as handle:
        pickle.dump(refs, handle, protocol=2)
    with pytest.raises(ConversionError, match=r"refs\(unc\)\.p: \[0\]: missing key 'ann_id'"):
        convert_refcoco(root)


# ----------------------------------------------------------------------------------------------- safe pickle
def test_safe_pickle_refuses_os_system_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    root = make_refer(tmp_path / "refer")
    evil_path = root / "refcoco" / "refs(unc).p"
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        evil_path.write_bytes(pickle.dumps([{"split": "val", "x": Evil(marker)}], protocol=protocol))
        with pytest.raises(UnsafePickleError, match=r"refused to load global '(posix|os|nt)\.system'") as info:
            safe_load_pickle(evil_path)
        assert str(evil_path) in str(info.value)
        with pytest.raises(ConversionError, match=r"refs\(unc\)\.p: refused to load global"):
            convert_refcoco(root)
    assert not marker.exists()


def test_safe_pickle_refuses_other_globals_and_garbage(tmp_path: Path) -> None:
    import collections

    path = tmp_path / "data.p"
    path.write_bytes(pickle.dumps(collections.OrderedDict(a=1), protocol=4))
    with pytest.raises(UnsafePickleError, match=r"'collections\.OrderedDict'"):
        safe_load_pickle(path)
    path.write_bytes(b"\x80\x02cbuiltins\neval\nq\x00.")
    with pytest.raises(UnsafePickleError, match=r"'builtins\.eval'"):
        safe_load_pickle(path)
    path.write_bytes(b"\x80\x02P1\n.")  # persistent id
    with pytest.raises(UnsafePickleError, match="persistent id"):
        safe_load_pickle(path)
    path.write_bytes(pickle.dumps([1, 2, 3], protocol=2)[:-3])
    with pytest.raises(UnsafePickleError, match=r"data\.p: not a valid plain-data pickle"):
        safe_load_pickle(path)
    with pytest.raises(FileNotFoundError, match=r"missing\.p: pickle file not found"):
        safe_load_pickle(tmp_path / "missing.p")


def test_safe_pickle_loads_plain_data(tmp_path: Path) -> None:
    data = {"a": [1, 2.5, None, True, "text", b"raw"], "t": (1, "x"), "n": {"deep": [[{}]]}, "big": 2**70}
    path = tmp_path / "plain.p"
    for protocol in range(3, pickle.HIGHEST_PROTOCOL + 1):
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        assert safe_load_pickle(path) == data
    path.write_bytes(pickle.dumps({"s": {1, 2}, "f": frozenset("ab")}, protocol=4))  # set opcodes, no global
    assert safe_load_pickle(path) == {"s": {1, 2}, "f": frozenset("ab")}
    path.write_bytes(pickle.dumps({1, 2}, protocol=3))  # protocol < 4 pickles a set as a call of builtins.set
    with pytest.raises(UnsafePickleError, match=r"'builtins\.set'"):
        safe_load_pickle(path)
    path.write_bytes(b"\x80\x02](U\x05helloU\x02\xc3\xa9U\x01\xe9e.")  # Python-2 str: UTF-8, then Latin-1
    assert safe_load_pickle(path) == ["hello", "é", "é"]
    path.write_bytes(b"(lp0\nS'caf\\xc3\\xa9'\np1\na.")  # Python-2 protocol 0
    assert safe_load_pickle(path) == ["café"]


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_coco(tmp_path: Path) -> None:
    instances = write_json(tmp_path / "instances.json", coco_instances())
    captions = write_json(tmp_path / "captions.json", coco_captions())
    out = tmp_path / "out" / "coco.jsonl"
    images, report = str(tmp_path / "images"), str(tmp_path / "r.json")
    result = run_cli("coco", "--instances", str(instances), "--captions", str(captions), "--images-dir", images,
                     "--out", str(out), "--report-json", report)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "coco: 2 records, 3 regions" in result.stdout and "crowd_box: 1" in result.stdout
    records = read_region_text(out, strict=True)
    assert records[0].image == "../images/000000000001.jpg" and records[0].caption == "A person next to a dog."
    assert json.loads((tmp_path / "r.json").read_text())["skipped"]["degenerate_box"] == 1


def test_cli_vg_and_refcoco(tmp_path: Path) -> None:
    regions_json, image_data_json = vg_files(tmp_path)
    out = tmp_path / "vg.jsonl"
    result = run_cli("vg", "--region-descriptions", str(regions_json), "--image-data", str(image_data_json),
                     "--images-dir", "vg", "--image-paths", "as-given", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [r.image for r in read_region_text(out, strict=True)] == ["vg/1.jpg", "vg/2.jpg"]
    root = make_refer(tmp_path / "refer")
    out = tmp_path / "refcoco.jsonl"
    result = run_cli("refcoco", "--root", str(root), "--split", "val", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "refcoco: 1 records, 2 regions" in result.stdout
    assert len(read_region_text(out, strict=True)[0].regions) == 2


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Error paths of the CLI, in-process (the subprocess tests above cover ``python -m``)."""

    def cli(*args: str) -> tuple[int, str, str]:
        code = convert_main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    out = tmp_path / "x.jsonl"
    code, _, err = cli("coco", "--instances", str(tmp_path / "instances_train2017.json"), "--out", str(out))
    assert code == 2 and "instances_train2017.json: file not found; expected a COCO instances file" in err
    data = coco_instances()
    del data["annotations"]
    bad = write_json(tmp_path / "bad.json", data)
    code, _, err = cli("coco", "--instances", str(bad), "--out", str(out))
    assert code == 2 and "bad.json: missing key 'annotations'" in err
    data = coco_instances()
    data["annotations"] = [a for a in data["annotations"] if a["id"] in (21, 22)]  # only unusable boxes
    only_bad = write_json(tmp_path / "only_bad.json", data)
    code, stdout, err = cli("coco", "--instances", str(only_bad), "--out", str(out))
    assert code == 1 and "nothing converted" in err
    assert "out_of_range_box: 1" in stdout and not out.exists()
    root = make_refer(tmp_path / "refer")
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([Evil(tmp_path / "pwned")], protocol=2))
    code, _, err = cli("refcoco", "--root", str(root), "--out", str(out))
    assert code == 2 and "refused to load global" in err
    assert not (tmp_path / "pwned").exists()
