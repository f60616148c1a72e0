"""Tests of the synthetic world generator (``cloc_encoder.data.synthetic``)."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cloc_encoder.data.format import Region, RegionTextRecord, read_region_text
from cloc_encoder.data.synthetic import (
    SyntheticWorldConfig,
    build_scene,
    generate_scene,
    generate_split,
    generate_world,
    iter_split,
    main,
    scene_rng,
    scene_to_record,
    summarize,
    world_is_current,
)

REPO = Path(__file__).resolve().parents[1]
SMALL_SIZES = {"train": 12, "val": 4, "test": 4}


# --- an independent resolver for the expression grammar documented in docs/data_format.md -------------------------


def _centre(region: Region) -> tuple[float, float]:
    x1, y1, x2, y2 = region.box
    return (x1 + x2) / 2, (y1 + y2) / 2


def _description_matches(text: str, regions: list[Region], config: SyntheticWorldConfig) -> list[int] | None:
    colours = "|".join(name for name, _ in config.colours)
    sizes = "|".join(name for name, _, _ in config.sizes)
    shapes = "|".join(config.shapes)
    match = re.fullmatch(rf"(?:({sizes}) )?(?:({colours}) )?({shapes})", text)
    if match is None:
        return None
    wanted = dict(zip(("size", "colour", "shape"), match.groups(), strict=True))
    return [
        i
        for i, region in enumerate(regions)
        if all(value is None or region.attributes[key] == value for key, value in wanted.items())
    ]


def resolve(expression: str, regions: list[Region], config: SyntheticWorldConfig) -> list[int]:
    """Objects an expression refers to, from the record's attributes and boxes only."""
    margin = config.relation_margin
    superlative = re.fullmatch(r"the (leftmost|rightmost|topmost|bottommost) (.+)", expression)
    if superlative:
        candidates = _description_matches(superlative.group(2), regions, config) or []
        axis = 0 if superlative.group(1) in ("leftmost", "rightmost") else 1
        sign = 1 if superlative.group(1) in ("leftmost", "topmost") else -1
        best = [i for i in candidates if all(
            sign * (_centre(regions[j])[axis] - _centre(regions[i])[axis]) >= margin for j in candidates if j != i
        )]  # fmt: skip
        return best
    relation = re.fullmatch(r"the (.+) (left of|right of|above|below) the (.+)", expression)
    if relation:
        targets = _description_matches(relation.group(1), regions, config)
        landmarks = _description_matches(relation.group(3), regions, config)
        if targets is None or landmarks is None or len(landmarks) != 1:
            return []
        (lx, ly), rel = _centre(regions[landmarks[0]]), relation.group(2)
        holds = {
            "left of": lambda x, y: lx - x >= margin,
            "right of": lambda x, y: x - lx >= margin,
            "above": lambda x, y: ly - y >= margin,
            "below": lambda x, y: y - ly >= margin,
        }[rel]
        return [i for i in targets if i != landmarks[0] and holds(*_centre(regions[i]))]
    plain = re.fullmatch(r"the (.+)", expression)
    return (_description_matches(plain.group(1), regions, config) or []) if plain else []


def candidate_expressions(regions: list[Region]) -> list[str]:
    """Every grammar expression built from descriptions of objects in the scene (for completeness checks)."""
    descriptions = sorted(
        {
            " ".join(region.attributes[k] for k in keys)
            for region in regions
            for keys in (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"))
        }
    )
    found = [f"the {d}" for d in descriptions]
    for d, e in itertools.product(descriptions, repeat=2):
        found += [f"the {d} {rel} the {e}" for rel in ("left of", "right of", "above", "below")]
    found += [f"the {s} {d}" for s in ("leftmost", "rightmost", "topmost", "bottommost") for d in descriptions]
    return found


def is_relational(expression: str) -> bool:
    return (
        re.search(r"\b(left of|right of|above|below|leftmost|rightmost|topmost|bottommost)\b", expression) is not None
    )


def _records(config: SyntheticWorldConfig, split: str, count: int) -> list[RegionTextRecord]:
    return [record for _, record in iter_split(config, split, count)]


# --- tests ---------------------------------------------------------------------------------------------------------


def test_regeneration_is_byte_identical(tmp_path: Path) -> None:
    config = SyntheticWorldConfig(seed=3)
    generate_world(config, tmp_path / "a", SMALL_SIZES)
    generate_world(config, tmp_path / "b", SMALL_SIZES)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    assert len([f for f in files_a if f.suffix == ".png"]) == sum(SMALL_SIZES.values())
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    image_1, record_1 = generate_scene(config, scene_rng(config, "train", 5))
    image_2, record_2 = generate_scene(config, scene_rng(config, "train", 5))
    assert image_1.tobytes() == image_2.tobytes() and record_1 == record_2
    other_seed = SyntheticWorldConfig(seed=4)
    assert generate_scene(other_seed, scene_rng(other_seed, "train", 5))[0].tobytes() != image_1.tobytes()


def test_splits_are_disjoint_streams() -> None:
    config = SyntheticWorldConfig()
    hashes = {}
    for split, count in {"train": 300, "val": 100, "test": 100}.items():
        hashes[split] = {hashlib.sha256(image.tobytes()).hexdigest() for image, _ in iter_split(config, split, count)}
        assert len(hashes[split]) == count  # no repeats inside a split either
    assert not hashes["train"] & hashes["val"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]


def test_boxes_are_tight_and_objects_visible() -> None:
    config = SyntheticWorldConfig()
    palette = {name: np.array(rgb) for name, rgb in config.colours}
    n = config.image_size
    counts = set()
    for index in range(150):
        scene = build_scene(config, scene_rng(config, "train", index))
        record = scene_to_record(scene, config, "x", "x.png")
        pixels = np.asarray(scene.image)
        counts.add(len(scene.objects))
        assert config.min_objects <= len(record.regions) <= config.max_objects
        allowed = {tuple(config.background), *(tuple(v) for v in palette.values())}
        assert {tuple(p) for p in pixels.reshape(-1, 3)} <= allowed
        for i, region in enumerate(record.regions):
            x1, y1, x2, y2 = region.box
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
            rows, cols = np.nonzero(scene.masks[i])
            assert [x1 * n, y1 * n, x2 * n, y2 * n] == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            assert scene.visible[i].sum() >= (1 - config.max_occlusion) * scene.masks[i].sum() - 1e-9
            assert (pixels[scene.visible[i]] == palette[region.attributes["colour"]]).all()
        for colour, rgb in palette.items():
            inside = np.zeros((n, n), bool)
            for region in record.regions:
                if region.attributes["colour"] == colour:
                    c1, r1, c2, r2 = (round(v * n) for v in region.box)
                    inside[r1:r2, c1:c2] = True
            assert not ((pixels == rgb).all(-1) & ~inside).any(), f"{colour} pixels outside its boxes"
        top = record.regions[-1]  # never covered: its colour touches all four box edges
        c1, r1, c2, r2 = (round(v * n) for v in top.box)
        own = (pixels[r1:r2, c1:c2] == palette[top.attributes["colour"]]).all(-1)
        assert own[0].any() and own[-1].any() and own[:, 0].any() and own[:, -1].any()
    assert counts == {2, 3}


def test_every_expression_identifies_its_object_and_is_shortest() -> None:
    config = SyntheticWorldConfig(duplicate_probability=0.6)
    relational = described = 0
    for record in _records(config, "val", 250):
        assert record.caption.startswith("a ")
        for i, region in enumerate(record.regions):
            assert region.caption == " ".join(region.attributes[k] for k in ("size", "colour", "shape"))
            assert region.category == f"{region.attributes['colour']} {region.attributes['shape']}"
            for expression in region.expressions:
                assert resolve(expression, record.regions, config) == [i], (record.id, expression)
            if not region.expressions:
                assert not any(resolve(e, record.regions, config) == [i] for e in candidate_expressions(record.regions))
                continue
            described += 1
            if any(is_relational(e) for e in region.expressions):
                assert all(is_relational(e) for e in region.expressions)
                relational += 1
                shorter = [e for e in candidate_expressions(record.regions) if not is_relational(e)]
            else:  # attribute-only: all at one level, and no shorter attribute description identifies the object
                (level,) = {len(e.split()) for e in region.expressions}
                shorter = [
                    e for e in candidate_expressions(record.regions) if not is_relational(e) and len(e.split()) < level
                ]
            assert not any(resolve(e, record.regions, config) == [i] for e in shorter)
    assert described > 0 and relational > 0


def test_duplicates_are_controlled_and_need_relations() -> None:
    none = _records(SyntheticWorldConfig(duplicate_probability=0.0), "train", 150)
    assert all(len({r.category for r in rec.regions}) == len(rec.regions) for rec in none)
    assert summarize(none)["relational_share"] == 0.0
    default = summarize(_records(SyntheticWorldConfig(), "train", 400))
    assert 0.2 < default["scenes_with_duplicates"] < 0.4
    always = _records(SyntheticWorldConfig(duplicate_probability=1.0), "train", 150)
    twins = 0
    for record in always:
        assert len({r.category for r in record.regions}) == len(record.regions) - 1
        for region in record.regions:
            same = [r for r in record.regions if r.attributes == region.attributes]
            if len(same) > 1:
                twins += 1
                assert all(is_relational(e) for e in region.expressions)
    assert twins > 0
    assert summarize(always)["relational_share"] > 0.2


def test_clutter_option() -> None:
    plain, cluttered = SyntheticWorldConfig(), SyntheticWorldConfig(clutter=True)
    palette = {tuple(rgb) for _, rgb in plain.colours} | {tuple(plain.background)}
    off_palette = 0
    for index in range(40):
        scene = build_scene(cluttered, scene_rng(cluttered, "test", index))
        reference = build_scene(plain, scene_rng(plain, "test", index))
        assert scene.objects == reference.objects  # clutter is drawn after the layout is sampled
        pixels = np.asarray(scene.image)
        off_palette += int(sum(tuple(p) not in palette for p in pixels.reshape(-1, 3)) > 0)
        for i, obj in enumerate(scene.objects):
            assert (pixels[scene.visible[i]] == dict(cluttered.colours)[obj.colour]).all()
    assert off_palette == 40


def test_jsonl_reads_back_strictly(tmp_path: Path) -> None:
    config = SyntheticWorldConfig(image_size=48)
    path = generate_split(config, "val", 10, tmp_path)
    assert path == tmp_path / "val.jsonl"
    records = read_region_text(path, strict=True)
    expected = _records(config, "val", 10)
    assert [r.to_json() for r in records] == [r.to_json() for r in expected]
    for record in records:
        assert record.image == f"images/val/{record.id}.png" and record.width == record.height == 48
        assert record.image_path.is_file() and record.source == "synthetic"
    generate_split(config, "val", 6, tmp_path)  # stale images of a larger run are removed
    assert len(list((tmp_path / "images" / "val").glob("*.png"))) == 6


def test_world_is_skipped_when_current(tmp_path: Path) -> None:
    config = SyntheticWorldConfig()
    generate_world(config, tmp_path, SMALL_SIZES)
    world = json.loads((tmp_path / "world.json").read_text())
    assert SyntheticWorldConfig.from_dict(world["config"]) == config and world["splits"] == SMALL_SIZES
    assert world_is_current(config, tmp_path, SMALL_SIZES)
    stamp = (tmp_path / "train.jsonl").stat().st_mtime_ns
    generate_world(config, tmp_path, SMALL_SIZES)
    assert (tmp_path / "train.jsonl").stat().st_mtime_ns == stamp
    assert not world_is_current(SyntheticWorldConfig(seed=1), tmp_path, SMALL_SIZES)
    assert not world_is_current(config, tmp_path, {**SMALL_SIZES, "train": 13})
    (tmp_path / "images" / "test" / "syn-test-000000.png").unlink()
    assert not world_is_current(config, tmp_path, SMALL_SIZES)
    generate_world(config, tmp_path, SMALL_SIZES)
    assert world_is_current(config, tmp_path, SMALL_SIZES)


def test_config_validation() -> None:
    config = SyntheticWorldConfig(clutter=True, seed=7)
    assert SyntheticWorldConfig.from_dict(config.to_dict()) == config
    assert len(config.categories) == 12 and config.categories[0] == "red circle"
    with pytest.raises(ValueError):
        SyntheticWorldConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError):
        SyntheticWorldConfig(shapes=("circle", "hexagon"))
    with pytest.raises(ValueError):
        SyntheticWorldConfig(colours=(("left", (1, 2, 3)),))
    with pytest.raises(TypeError):
        SyntheticWorldConfig.from_dict({"nope": 1})


def test_cli_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    command = [sys.executable, "-m", "cloc_encoder.data.synthetic", "--out", str(tmp_path), "--train", "4"]
    command += ["--val", "2", "--test", "2", "--image-size", "32", "--clutter", "--seed", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "12 classes" in result.stdout and "train: 4 images" in result.stdout
    assert len(read_region_text(tmp_path / "test.jsonl", strict=True)) == 2
    assert json.loads((tmp_path / "world.json").read_text())["config"]["clutter"] is True
    assert main(command[3:]) == 0  # the rerun, in process (the subprocess start-up dominates the test's time)
    assert "up to date" in capsys.readouterr().out
