"""A deterministic synthetic world of coloured shapes with region captions and referring expressions.

Every image is ``image_size`` × ``image_size`` pixels holding 2–3 objects (colour × shape classes, two sizes),
drawn in order so later objects may partly cover earlier ones. Each image becomes a
:class:`~cloc_encoder.data.format.RegionTextRecord`: a whole-image caption and one
:class:`~cloc_encoder.data.format.Region` per object (in drawing order) whose ``box`` is the tight box of the
**full** object (including covered parts), ``xyxy`` normalised to ``[0, 1]`` by the original image's width and
height. Pixel ``(col, row)`` covers ``[col, col + 1) × [row, row + 1)``, so a box spanning columns ``c0..c1`` has
``x1 = c0 / W`` and ``x2 = (c1 + 1) / W``. Captions and expressions come from :mod:`.synthetic_language`.

Each image's random stream derives from ``(config.seed, split, index)`` only, so splits are disjoint streams and
regeneration is byte-identical. Command line::

    python -m cloc_encoder.data.synthetic --out DIR --train 2000 --val 200 --test 200 [--clutter] \
        [--min-objects 2 --max-objects 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cloc_encoder.data.format import (
    FORMAT_VERSION,
    Region,
    RegionTextRecord,
    atomic_write_text,
    read_region_text,
    write_region_text,
)
from cloc_encoder.data.synthetic_language import (
    ObjectFacts,
    Vocabulary,
    image_caption,
    is_relational,
    referring_expressions,
)

GENERATOR_VERSION = 1
"""Bumped whenever the same config would produce different files (invalidates cached worlds)."""

RGB = tuple[int, int, int]
DEFAULT_SPLIT_SIZES: dict[str, int] = {"train": 2000, "val": 200, "test": 200}
SHAPES_SUPPORTED = ("circle", "square", "triangle", "diamond")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_MAX_SCENE_ATTEMPTS = 200
_MAX_PLACEMENT_TRIES = 60


@dataclass(frozen=True)
class SyntheticWorldConfig:
    """Everything that determines the generated world (saved as ``world.json``).

    ``sizes`` maps a size word to a side-length range as fractions of ``image_size``. ``max_occlusion`` is the
    largest fraction of an object's pixels later objects may cover. ``relation_margin`` is the minimal distance
    between box centres (normalised units) for a spatial relation or superlative to hold.
    """

    image_size: int = 64
    min_objects: int = 2
    max_objects: int = 3
    colours: tuple[tuple[str, RGB], ...] = (
        ("red", (220, 40, 40)),
        ("green", (40, 160, 60)),
        ("blue", (40, 80, 220)),
        ("yellow", (235, 200, 20)),
    )
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    sizes: tuple[tuple[str, float, float], ...] = (("small", 0.16, 0.24), ("large", 0.32, 0.42))
    max_occlusion: float = 0.4
    duplicate_probability: float = 0.3
    relation_margin: float = 0.1
    clutter: bool = False
    clutter_colours: tuple[RGB, ...] = (
        (90, 90, 90),
        (128, 128, 128),
        (175, 175, 175),
        (140, 95, 60),
        (150, 100, 175),
        (235, 150, 190),
    )
    background: RGB = (255, 255, 255)
    seed: int = 0

    def __post_init__(self) -> None:
        _ = self.vocabulary  # validates the names
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= len(self.categories):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(self.categories)} classes")
        if unknown := set(self.shapes) - set(SHAPES_SUPPORTED):
            raise ValueError(f"unsupported shapes {sorted(unknown)}; supported: {SHAPES_SUPPORTED}")
        for name, low, high in self.sizes:
            if not 0 < low <= high <= 1:
                raise ValueError(f"size {name!r}: need 0 < low <= high <= 1 (fractions of image_size)")
        if not 0 <= self.max_occlusion < 1 or not 0 <= self.duplicate_probability <= 1:
            raise ValueError("max_occlusion must be in [0, 1) and duplicate_probability in [0, 1]")
        palette = [tuple(rgb) for _, rgb in self.colours]
        if len(set(palette)) != len(palette) or tuple(self.background) in palette:
            raise ValueError("object colours must be distinct from each other and from the background")
        if set(palette) & {tuple(c) for c in self.clutter_colours}:
            raise ValueError("clutter colours must be off-palette")

    @property
    def vocabulary(self) -> Vocabulary:
        """The words of this world (colour, shape and size names)."""
        return Vocabulary(tuple(n for n, _ in self.colours), tuple(self.shapes), tuple(n for n, _, _ in self.sizes))

    @property
    def categories(self) -> list[str]:
        """The colour × shape class names (``"red circle"`` …), in a fixed order."""
        return [f"{colour} {shape}" for colour, _ in self.colours for shape in self.shapes]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SyntheticWorldConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""

        def tuplify(value: Any) -> Any:
            return tuple(tuplify(v) for v in value) if isinstance(value, list) else value

        known = {f.name for f in fields(cls)}
        if unknown := set(data) - known:
            raise TypeError(f"unknown SyntheticWorldConfig fields: {sorted(unknown)}")
        return cls(**{k: tuplify(v) for k, v in data.items()})


@dataclass
class Scene:
    """One generated image with its objects (drawing order) and their full and visible pixel masks."""

    image: Image.Image
    objects: list[ObjectFacts]
    masks: np.ndarray = field(repr=False)  # (n, H, W) bool, full object silhouettes
    visible: np.ndarray = field(repr=False)  # (n, H, W) bool, the pixels showing in the image


def scene_rng(config: SyntheticWorldConfig, split: str, index: int) -> np.random.Generator:
    """The random stream of image ``index`` of ``split``: a function of ``(config.seed, split, index)`` only."""
    split_key = int.from_bytes(hashlib.sha256(split.encode("utf-8")).digest()[:8], "little")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([config.seed, split_key, index])))


def record_id(split: str, index: int) -> str:
    """Record id of image ``index`` of ``split`` (also its PNG file stem): ``syn-train-000042``."""
    return f"syn-{split}-{index:06d}"


def _shape_mask(shape: str, x0: int, y0: int, side: int, image_size: int) -> Image.Image:
    """A 0/255 mask of ``shape`` inscribed in the pixel square ``[x0, x0 + side) × [y0, y0 + side)``."""
    mask = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask)
    x1, y1 = x0 + side - 1, y0 + side - 1
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    else:  # diamond
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    return mask


def _dilate(mask: np.ndarray) -> np.ndarray:
    """``mask`` grown by one pixel in all eight directions."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    rows = grown.copy()
    grown[:, 1:] |= rows[:, :-1]
    grown[:, :-1] |= rows[:, 1:]
    return grown


def _sample_classes(config: SyntheticWorldConfig, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Colour/shape pairs of one scene; with ``duplicate_probability`` one class appears twice."""
    classes = [(colour, shape) for colour, _ in config.colours for shape in config.shapes]
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    duplicate = count >= 2 and rng.random() < config.duplicate_probability
    distinct = count - 1 if duplicate else count
    chosen = [classes[int(i)] for i in rng.choice(len(classes), size=distinct, replace=False)]
    if duplicate:
        chosen.append(chosen[int(rng.integers(distinct))])
        chosen = [chosen[int(i)] for i in rng.permutation(count)]
    return chosen


def _place_objects(
    config: SyntheticWorldConfig, rng: np.random.Generator, classes: Sequence[tuple[str, str]]
) -> tuple[list[tuple[str, str, str]], list[Image.Image]] | None:
    """Sample sizes and positions; ``None`` on failure.

    Every object keeps ``1 - max_occlusion`` of its pixels visible, and objects of the same colour neither overlap
    nor touch (so they never merge into one blob).
    """
    n = config.image_size
    attributes: list[tuple[str, str, str]] = []
    masks: list[Image.Image] = []
    arrays: list[np.ndarray] = []
    covered: list[np.ndarray] = []
    for colour, shape in classes:
        size_name, low, high = config.sizes[int(rng.integers(len(config.sizes)))]
        side = int(rng.integers(max(3, round(low * n)), max(3, round(high * n)) + 1))
        for _ in range(_MAX_PLACEMENT_TRIES):
            x0, y0 = (int(v) for v in rng.integers(0, n - side + 1, size=2))
            mask = _shape_mask(shape, x0, y0, side, n)
            array = np.asarray(mask) > 0
            new_cover = [c | (array & a) for c, a in zip(covered, arrays, strict=True)]
            grown = _dilate(array)
            if all(
                c.sum() <= config.max_occlusion * a.sum() for c, a in zip(new_cover, arrays, strict=True)
            ) and not any(
                (grown & a).any() for a, (other, _, _) in zip(arrays, attributes, strict=True) if other == colour
            ):
                covered = [*new_cover, np.zeros_like(array)]
                break
        else:
            return None
        attributes.append((colour, shape, size_name))
        masks.append(mask)
        arrays.append(array)
    return attributes, masks


def _draw_clutter(config: SyntheticWorldConfig, rng: np.random.Generator, draw: ImageDraw.ImageDraw) -> None:
    """Random grey / off-palette lines and blobs on the background (under the objects)."""
    n = config.image_size
    colours = config.clutter_colours
    for _ in range(int(rng.integers(2, 6))):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, n, size=4))
        draw.line([x0, y0, x1, y1], fill=tuple(colours[int(rng.integers(len(colours)))]), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(1, 4))):
        w, h = (int(v) for v in rng.integers(max(2, n // 20), max(3, n // 8) + 1, size=2))
        x0, y0 = int(rng.integers(0, n - w)), int(rng.integers(0, n - h))
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=tuple(colours[int(rng.integers(len(colours)))]))


def build_scene(config: SyntheticWorldConfig, rng: np.random.Generator) -> Scene:
    """Sample and draw one scene (image, objects with normalised full boxes, masks)."""
    for _ in range(_MAX_SCENE_ATTEMPTS):
        placed = _place_objects(config, rng, _sample_classes(config, rng))
        if placed is not None:
            break
    else:
        raise RuntimeError("could not place objects; lower max_objects or object sizes, or raise max_occlusion")
    n = config.image_size
    palette = dict(config.colours)
    image = Image.new("RGB", (n, n), tuple(config.background))
    if config.clutter:
        _draw_clutter(config, rng, ImageDraw.Draw(image))
    objects: list[ObjectFacts] = []
    for (colour, shape, size_name), mask in zip(*placed, strict=True):
        image.paste(tuple(palette[colour]), mask=mask)
        array = np.asarray(mask) > 0
        rows, cols = np.flatnonzero(array.any(axis=1)), np.flatnonzero(array.any(axis=0))
        box = (cols[0] / n, rows[0] / n, (cols[-1] + 1) / n, (rows[-1] + 1) / n)
        objects.append(ObjectFacts(colour, shape, size_name, tuple(float(v) for v in box)))  # type: ignore[arg-type]
    masks = np.stack([np.asarray(m) > 0 for m in placed[1]])
    later = np.flip(np.logical_or.accumulate(np.flip(masks, 0), axis=0), 0)  # later[i] = any(masks[i:])
    visible = masks & ~np.concatenate([later[1:], np.zeros_like(masks[:1])])
    return Scene(image=image, objects=objects, masks=masks, visible=visible)


def scene_to_record(scene: Scene, config: SyntheticWorldConfig, record_id: str, image_path: str) -> RegionTextRecord:
    """The region-text record of a scene: caption, and per object box, caption, category, expressions."""
    expressions = referring_expressions(scene.objects, config.vocabulary, config.relation_margin)
    regions = [
        Region(
            box=list(obj.box),
            caption=obj.caption,
            category=obj.category,
            expressions=exprs,
            attributes={"colour": obj.colour, "shape": obj.shape, "size": obj.size},
        )
        for obj, exprs in zip(scene.objects, expressions, strict=True)
    ]
    size = config.image_size
    caption = image_caption(scene.objects)
    return RegionTextRecord(record_id, image_path, size, size, caption, regions, source="synthetic")


def generate_scene(
    config: SyntheticWorldConfig, rng: np.random.Generator, *, record_id: str = "syn-000000", image_path: str = ""
) -> tuple[Image.Image, RegionTextRecord]:
    """One image and its record, in memory. ``image_path`` defaults to ``<record_id>.png``."""
    scene = build_scene(config, rng)
    return scene.image, scene_to_record(scene, config, record_id, image_path or f"{record_id}.png")


def iter_split(
    config: SyntheticWorldConfig, split: str, num_images: int
) -> Iterator[tuple[Image.Image, RegionTextRecord]]:
    """The images and records of ``split`` in memory, as :func:`generate_split` writes them."""
    if not _SPLIT_NAME.match(split):
        raise ValueError(f"split name {split!r} must match {_SPLIT_NAME.pattern}")
    for index in range(num_images):
        rid = record_id(split, index)
        yield generate_scene(
            config, scene_rng(config, split, index), record_id=rid, image_path=f"images/{split}/{rid}.png"
        )


def generate_split(config: SyntheticWorldConfig, split: str, num_images: int, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``out_dir/images/<split>/<id>.png`` and ``out_dir/<split>.jsonl`` (atomic); returns the JSONL path.

    Image paths in the JSONL are relative to ``out_dir``. Stale PNGs of this split from a larger run are removed.
    """
    out_dir = Path(out_dir)
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for image, record in iter_split(config, split, num_images):
        image.save(out_dir / record.image, format="PNG")
        records.append(record)
    keep = {Path(r.image).name for r in records}
    for stale in image_dir.glob(f"syn-{split}-*.png"):
        if stale.name not in keep:
            stale.unlink()
    path = out_dir / f"{split}.jsonl"
    write_region_text(records, path)
    return path


def _manifest(config: SyntheticWorldConfig, sizes: Mapping[str, int]) -> dict[str, Any]:
    return {
        "generator_version": GENERATOR_VERSION,
        "format_version": FORMAT_VERSION,
        "splits": {k: int(v) for k, v in sizes.items()},
        "config": config.to_dict(),
    }


def world_is_current(
    config: SyntheticWorldConfig, out_dir: str | os.PathLike[str], sizes: Mapping[str, int] = DEFAULT_SPLIT_SIZES
) -> bool:
    """Whether ``out_dir`` already holds this exact world (same config, split sizes, generator; files present)."""
    out_dir = Path(out_dir)
    try:
        stored = json.loads((out_dir / "world.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if stored != _manifest(config, sizes):
        return False
    for split, count in sizes.items():
        if not (out_dir / f"{split}.jsonl").is_file():
            return False
        if not all((out_dir / "images" / split / f"{record_id(split, i)}.png").is_file() for i in range(count)):
            return False
    return True


def generate_world(
    config: SyntheticWorldConfig,
    out_dir: str | os.PathLike[str],
    sizes: Mapping[str, int] = DEFAULT_SPLIT_SIZES,
    *,
    force: bool = False,
) -> dict[str, Path]:
    """Write every split plus ``out_dir/world.json``; skipped when :func:`world_is_current` (unless ``force``).

    Returns ``{split: jsonl path}``. ``world.json`` is removed first and written last, so an interrupted run is
    regenerated next time.
    """
    out_dir = Path(out_dir)
    paths = {split: out_dir / f"{split}.jsonl" for split in sizes}
    if not force and world_is_current(config, out_dir, sizes):
        return paths
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "world.json").unlink(missing_ok=True)
    for split, count in sizes.items():
        generate_split(config, split, int(count), out_dir)
    atomic_write_text(out_dir / "world.json", json.dumps(_manifest(config, sizes), indent=2, sort_keys=True) + "\n")
    return paths


def summarize(records: Sequence[RegionTextRecord]) -> dict[str, Any]:
    """Counts for a split: images, regions per image, classes, and how many objects needed relations."""
    regions = [region for record in records for region in record.regions]
    described = [region for region in regions if region.expressions]
    relational = [region for region in described if is_relational(region.expressions[0])]
    duplicates = sum(len({r.category for r in rec.regions}) < len(rec.regions) for rec in records)
    return {
        "images": len(records),
        "regions_per_image": len(regions) / max(1, len(records)),
        "classes": sorted({str(region.category) for region in regions}),
        "scenes_with_duplicates": duplicates / max(1, len(records)),
        "relational_share": len(relational) / max(1, len(described)),
        "regions_without_expression": len(regions) - len(described),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m cloc_encoder.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    for split, default in DEFAULT_SPLIT_SIZES.items():
        parser.add_argument(f"--{split}", type=int, default=default, help=f"{split} images (default {default})")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--min-objects", type=int, default=SyntheticWorldConfig.min_objects, help="objects per image")
    parser.add_argument("--max-objects", type=int, default=SyntheticWorldConfig.max_objects)
    parser.add_argument("--clutter", action="store_true", help="cluttered backgrounds")
    parser.add_argument("--duplicate-probability", type=float, default=SyntheticWorldConfig.duplicate_probability)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate even if the world is up to date")
    args = parser.parse_args(argv)
    try:
        config = SyntheticWorldConfig(
            image_size=args.image_size,
            clutter=args.clutter,
            duplicate_probability=args.duplicate_probability,
            min_objects=args.min_objects,
            max_objects=args.max_objects,
            seed=args.seed,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sizes = {split: getattr(args, split) for split in DEFAULT_SPLIT_SIZES}
    start = time.perf_counter()
    current = not args.force and world_is_current(config, args.out, sizes)
    paths = generate_world(config, args.out, sizes, force=args.force)
    elapsed = time.perf_counter() - start
    print(f"{args.out}: {'up to date, skipped' if current else f'generated in {elapsed:.1f}s'}")
    print(f"{len(config.categories)} classes: {', '.join(config.categories)}")
    for split, path in paths.items():
        stats = summarize(read_region_text(path, strict=True))
        print(
            f"  {split}: {stats['images']} images, {stats['regions_per_image']:.2f} regions/image, "
            f"{len(stats['classes'])} classes seen, {stats['scenes_with_duplicates']:.0%} scenes with duplicates, "
            f"{stats['relational_share']:.1%} of described objects need relations, "
            f"{stats['regions_without_expression']} objects without a unique expression"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
