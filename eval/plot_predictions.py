"""Qualitative examples of a grounding evaluation: the image, the question, the ground-truth box (green) and the
predicted box (red), with the IoU and the answer in a caption strip (``python -m eval plot``).

    python -m eval plot --predictions OUT/predictions_grounding.jsonl --out OUT/plots [--num 16] [--only-misses]
        [--seed 0] [--box-codec int999|float] [--images DIR] [--tile 384]

Works on the predictions of ``python -m eval regions`` (``predictions_grounding.jsonl``), ``refcoco``
(``predictions_rec.jsonl``) and ``flickr30k`` (``predictions.jsonl``): each record carries ``image`` and
``target_box`` (normalised original-frame ``xyxy``; Flickr30k: the merged box of the phrase's entity). Records
without them (files written before they were recorded, referring/REG/Ferret-Bench answers) are counted and skipped.
The answer's first box is read with the box codec in the folder's ``eval_run.json`` (or ``--box-codec``), as the
benchmark scored it.

Writes under ``--out``: ``contact_sheet.png`` (every example in a grid), ``NNN_<id>.png`` (one per example) and
``examples.jsonl`` (id, IoU, hit, file, image, question, answer).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from cloc_encoder.boxes import box_iou_pairwise
from cloc_encoder.data.images import IMAGE_ERRORS
from eval.mllm_generation import RUN_FILE
from eval.predictions import PredictionStore
from mllm.box_codec import DEFAULT_BOX_CODEC, Box, BoxCodec, get_box_codec

HIT_IOU = 0.5
GT_COLOR = (0, 200, 0)
PRED_COLOR = (230, 0, 0)
CAPTION_BACKGROUND = (240, 240, 240)
TEXT_COLOR = (20, 20, 20)
MAX_TEXT_LINES = 3
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class PlotExample:
    """One grounding prediction ready to draw; boxes are normalised original-frame ``xyxy``."""

    id: str
    image: str
    question: str
    answer: str | None
    target_box: Box
    predicted_box: Box | None
    iou: float

    @property
    def hit(self) -> bool:
        return self.iou >= HIT_IOU


@dataclass
class PlotReport:
    """What :func:`plot_predictions` read, chose and wrote."""

    predictions: str
    box_codec: str
    records: int = 0
    without_target: int = 0
    missing_images: int = 0
    drawable: int = 0
    misses: int = 0
    unreadable_images: int = 0
    files: list[str] = field(default_factory=list)


def recorded_box_codec(folder: Path) -> str | None:
    """The ``box_codec`` in ``folder/eval_run.json`` (``None`` when absent)."""
    path = folder / RUN_FILE
    if not path.is_file():
        return None
    codec = json.loads(path.read_text(encoding="utf-8")).get("box_codec")
    return codec if isinstance(codec, str) else None


def _target(record: dict[str, Any]) -> Box | None:
    box = record.get("target_box")
    if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, int | float) for v in box):
        return None
    return tuple(float(v) for v in box)  # type: ignore[return-value]


def load_examples(path: Path, codec: BoxCodec) -> tuple[list[PlotExample], int]:
    """The records of a predictions file that have ``image`` and ``target_box`` → ``(examples in file order, number
    of records without them)``; each answer's first box is read with ``codec``."""
    records = list(PredictionStore(path).predictions.values())
    usable = [(r, _target(r)) for r in records if isinstance(r.get("image"), str) and _target(r) is not None]
    predicted = [codec.parse_first_box(r.get("answer")) for r, _ in usable]
    ious = [0.0] * len(usable)
    if usable:
        pred = torch.tensor([p or (0.0, 0.0, 0.0, 0.0) for p in predicted], dtype=torch.float64)
        gt = torch.tensor([t for _, t in usable], dtype=torch.float64)
        ious = [0.0 if p is None else v for p, v in zip(predicted, box_iou_pairwise(pred, gt).tolist(), strict=True)]
    examples = [
        PlotExample(str(r["id"]), r["image"], str(r.get("question", "")), r.get("answer"), t, p, iou)  # type: ignore[arg-type]
        for (r, t), p, iou in zip(usable, predicted, ious, strict=True)
    ]
    return examples, len(records) - len(usable)


def resolve_image(image: str, images_dir: Path | None = None) -> Path | None:
    """The recorded image path if it exists (relative paths: from the working directory), else
    ``images_dir/<file name>``; ``None`` when neither exists."""
    path = Path(image)
    if path.is_file():
        return path
    if images_dir is not None and (images_dir / path.name).is_file():
        return images_dir / path.name
    return None


def select_examples(
    examples: list[PlotExample], num: int, only_misses: bool = False, seed: int = 0
) -> list[PlotExample]:
    """A seeded random choice of ``num`` examples (misses only: IoU < 0.5), kept in file order."""
    pool = [e for e in examples if not e.hit] if only_misses else examples
    if len(pool) <= num:
        return list(pool)
    chosen = set(random.Random(seed).sample(range(len(pool)), num))
    return [e for i, e in enumerate(pool) if i in chosen]


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def wrap_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: float, max_lines: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels (long words cut), at most ``max_lines`` (the last
    one ending in "…" when text was left out)."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while draw.textlength(word, font=font) > width and len(word) > 1:
            fits = (i for i in range(len(word) - 1, 0, -1) if draw.textlength(word[:i], font=font) <= width)
            cut = next(fits, 1)
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 1)] + "…"
    return lines or [""]


def _draw_box(draw: ImageDraw.ImageDraw, box: Box, size: tuple[int, int], color: tuple[int, int, int], width: int):
    w, h = size
    x1, y1 = box[0] * w, box[1] * h
    x2, y2 = max(x1, box[2] * w - 1), max(y1, box[3] * h - 1)
    draw.rectangle((x1, y1, x2, y2), outline=color, width=width)


def render_example(example: PlotExample, image: Image.Image, tile: int = 384) -> Image.Image:
    """``tile`` pixels wide: the image (longer side ``tile``) at the top left with the ground-truth box in green and
    the predicted box in red, above a caption strip (IoU, id, question, answer)."""
    scale = tile / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    picture = image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    line = max(2, tile // 128)
    draw = ImageDraw.Draw(picture)
    _draw_box(draw, example.target_box, size, GT_COLOR, line)
    if example.predicted_box is not None:
        _draw_box(draw, example.predicted_box, size, PRED_COLOR, line)

    font_size = max(10, tile // 28)
    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    verdict = "hit" if example.hit else "miss"
    score = (
        f"IoU {example.iou:.2f} ({verdict})" if example.predicted_box is not None else f"no box in answer ({verdict})"
    )
    lines = wrap_text(measure, f"{score}  {example.id}", font, tile - 8, 1)
    lines += wrap_text(measure, example.question, font, tile - 8, MAX_TEXT_LINES)
    answer = "(unreadable image)" if example.answer is None else example.answer
    lines += wrap_text(measure, f"answer: {answer}", font, tile - 8, MAX_TEXT_LINES)
    line_height = round(font_size * 1.3)
    canvas = Image.new("RGB", (tile, size[1] + 6 + line_height * len(lines)), CAPTION_BACKGROUND)
    canvas.paste(picture, (0, 0))
    text = ImageDraw.Draw(canvas)
    for number, content in enumerate(lines):
        color = (PRED_COLOR if not example.hit else GT_COLOR) if number == 0 else TEXT_COLOR
        text.text((4, size[1] + 3 + number * line_height), content, fill=color, font=font)
    return canvas


def contact_sheet(tiles: list[Image.Image], title: str, columns: int | None = None, gap: int = 6) -> Image.Image:
    """The tiles in a grid (``columns``: default up to 4) under a one-line title."""
    columns = columns or min(4, math.ceil(math.sqrt(len(tiles))))
    rows = math.ceil(len(tiles) / columns)
    cell_w, cell_h = max(t.width for t in tiles), max(t.height for t in tiles)
    font_size = max(12, cell_w // 24)
    header = round(font_size * 1.6)
    width = columns * cell_w + (columns + 1) * gap
    sheet = Image.new("RGB", (width, header + rows * (cell_h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = _font(font_size)
    draw.text(
        (gap, (header - font_size) // 2),
        wrap_text(draw, title, font, width - 2 * gap, 1)[0],
        fill=TEXT_COLOR,
        font=font,
    )
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        sheet.paste(tile, (gap + column * (cell_w + gap), header + row * (cell_h + gap)))
    return sheet


def plot_predictions(
    predictions: str | Path,
    out_dir: str | Path,
    *,
    num: int = 16,
    only_misses: bool = False,
    seed: int = 0,
    box_codec: str | None = None,
    images_dir: str | Path | None = None,
    tile: int = 384,
) -> PlotReport:
    """Draw ``num`` examples of a grounding predictions file into ``out_dir`` (see the module docstring); returns
    what was read and written. Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for a bad one."""
    path, out = Path(predictions), Path(out_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such predictions file")
    codec = get_box_codec(box_codec or recorded_box_codec(path.parent) or DEFAULT_BOX_CODEC)
    report = PlotReport(predictions=str(path), box_codec=codec.name)
    examples, report.without_target = load_examples(path, codec)
    report.records = len(examples) + report.without_target
    images = Path(images_dir) if images_dir is not None else None
    found = {e.id: resolve_image(e.image, images) for e in examples}
    report.missing_images = sum(1 for p in found.values() if p is None)
    candidates = [e for e in examples if found[e.id] is not None]
    report.drawable, report.misses = len(candidates), sum(1 for e in candidates if not e.hit)
    for stale in out.glob("[0-9][0-9][0-9]_*.png"):  # a previous plot into the same folder
        stale.unlink()
    tiles, rows = [], []
    for example in select_examples(candidates, num, only_misses, seed):
        try:
            with Image.open(found[example.id]) as image:  # type: ignore[arg-type]
                tile_image = render_example(example, image, tile)
        except IMAGE_ERRORS:
            report.unreadable_images += 1
            continue
        name = f"{len(tiles):03d}_{_UNSAFE.sub('_', example.id)[:80]}.png"
        out.mkdir(parents=True, exist_ok=True)
        tile_image.save(out / name)
        tiles.append(tile_image)
        report.files.append(name)
        rows.append(
            {
                "id": example.id,
                "iou": round(example.iou, 4),
                "hit": example.hit,
                "file": name,
                "image": example.image,
                "question": example.question,
                "answer": example.answer,
            }
        )
    if tiles:
        kind = "misses" if only_misses else "examples"
        title = f"{path.name}: {len(tiles)} {kind} (seed {seed}); green = ground truth, red = prediction"
        contact_sheet(tiles, title).save(out / "contact_sheet.png")
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out / "examples.jsonl").write_text(lines, encoding="utf-8")
    return report


def add_parser(subparsers: Any) -> None:
    """Register ``python -m eval plot``."""
    parser = subparsers.add_parser(
        "plot",
        help="draw grounding predictions: image, question, ground-truth (green) and predicted (red) boxes",
        description="Render qualitative examples of a grounding predictions file (regions, refcoco, flickr30k) "
        "as PNGs and a contact sheet (docs/evaluation.md).",
    )
    parser.add_argument("--predictions", required=True, type=Path, help="OUT/predictions_*.jsonl of a benchmark")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNGs (e.g. OUT/plots)")
    parser.add_argument("--num", type=int, default=16, help="examples to draw (default 16)")
    parser.add_argument("--only-misses", action="store_true", help="draw only answers with IoU < 0.5")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random choice of examples (default 0)")
    parser.add_argument("--box-codec", help="box codec of the answers (default: eval_run.json's, else int999)")
    parser.add_argument("--images", type=Path, help="look here (by file name) for images not at the recorded path")
    parser.add_argument("--tile", type=int, default=384, help="width of one example in pixels (default 384)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """``python -m eval plot``: exit 0 when examples were drawn (or no miss was left to draw), 1 when none could
    be, 2 on a bad flag or file."""
    if args.num < 1 or args.tile < 32:
        print("error: --num must be positive and --tile at least 32", file=sys.stderr)
        return 2
    try:
        report = plot_predictions(
            args.predictions,
            args.out,
            num=args.num,
            only_misses=args.only_misses,
            seed=args.seed,
            box_codec=args.box_codec,
            images_dir=args.images,
            tile=args.tile,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if report.without_target:
        print(
            f"note: {report.without_target} of {report.records} records have no image/target_box (written before "
            "they were recorded, or not a grounding task); rerun the benchmark into a new --out to plot them",
            file=sys.stderr,
        )
    if report.missing_images:
        print(f"warning: {report.missing_images} images not found (try --images DIR)", file=sys.stderr)
    if report.files:
        print(f"wrote {len(report.files)} examples and {args.out / 'contact_sheet.png'} (box codec {report.box_codec})")
        return 0
    if args.only_misses and report.drawable and not report.misses:
        print(f"no miss to plot: all {report.drawable} answers have IoU >= {HIT_IOU}")
        return 0
    print(f"error: nothing could be plotted from {args.predictions}", file=sys.stderr)
    return 1


__all__ = [
    "HIT_IOU",
    "PlotExample",
    "PlotReport",
    "add_parser",
    "contact_sheet",
    "load_examples",
    "plot_predictions",
    "recorded_box_codec",
    "render_example",
    "resolve_image",
    "run",
    "select_examples",
    "wrap_text",
]
