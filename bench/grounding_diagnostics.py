"""Why does a CLOC-LLaVA not ground? Three diagnostics of its grounding on held-out region-text records.

    python -m bench.grounding_diagnostics --model runs/mllm_tiny_stage2 --data runs/world/test.jsonl \
        --predictions runs/mllm_tiny_stage2/step-000400/eval_test/predictions_grounding.jsonl --images 80

Questions are asked as ``python -m eval regions`` asks them (the first expression of each region, the model's
chat template, the image first):

- **answers** (needs ``--predictions``, the file ``eval regions`` wrote): on images with several questions, how
  often the answers differ; how often the object whose box overlaps the predicted box most is the asked one
  (*selection*; chance is one over the image's objects); mean IoU and Acc@0.5 on the questions where it is
  (*localisation*).
- **digits**: teacher-forced accuracy of the model's argmax at every digit of every coordinate of the target answer
  (``c0d0`` is the first digit of x1), i.e. how much of the box the model can write when the prefix is right.
- **attention**: at the position that writes the first digit of x1, per layer (mean over heads), the share of
  attention on image tokens and, of that, the share on the target's patches; uniform attention over the image puts
  the patches' share of the image there (``object_area``).

Writes JSON to ``--out`` (default: stdout only). Eager attention is used (for the attention weights); ``--device``
and ``--dtype`` as for ``python -m eval`` (a 7B model: ``--device cuda --dtype bfloat16``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cloc_encoder.boxes import box_iou_pairwise
from cloc_encoder.data.format import RegionTextRecord, read_region_text
from cloc_encoder.run_folder import resolve_model_folder
from eval.mllm_cli import DTYPE_NAMES
from eval.mllm_generation import prompt_text
from eval.regions.tasks import grounding_questions
from mllm import CLOCLlavaProcessor
from mllm.box_codec import get_box_codec
from mllm.loading import load_pretrained_model


def answer_diagnostics(records: Sequence[RegionTextRecord], predictions: Path, codec_name: str) -> dict[str, Any]:
    """Selection and localisation of the answers in ``predictions`` (``eval regions``' grounding file)."""
    codec = get_box_codec(codec_name)
    boxes_of = {str(record.image_path): [tuple(r.box) for r in record.regions] for record in records}
    answers: dict[str, set[str]] = defaultdict(set)
    asked: Counter[str] = Counter()
    selected = multi = hits = 0
    chance = 0.0  # sum over the counted questions of 1 / objects in their image
    ious: list[float] = []
    with open(predictions, encoding="utf-8") as handle:
        for line in handle:
            prediction = json.loads(line)
            image = prediction.get("image")
            if image not in boxes_of or prediction.get("target_box") is None:
                continue
            answers[image].add(str(prediction.get("answer")))
            asked[image] += 1
            objects = torch.tensor(boxes_of[image], dtype=torch.float64)
            box = codec.parse_first_box(prediction.get("answer"))
            if len(objects) < 2 or box is None:
                continue
            multi += 1
            chance += 1.0 / len(objects)
            target = torch.tensor(prediction["target_box"], dtype=torch.float64)
            overlaps = box_iou_pairwise(torch.tensor([box], dtype=torch.float64).expand(len(objects), 4), objects)
            if torch.allclose(objects[int(overlaps.argmax())], target, atol=1e-6):
                selected += 1
                iou = float(box_iou_pairwise(torch.tensor([box], dtype=torch.float64), target[None])[0])
                ious.append(iou)
                hits += iou >= 0.5
    several = [image for image, count in asked.items() if count > 1]
    return {
        "images_with_several_questions": len(several),
        "answers_differ": sum(len(answers[i]) > 1 for i in several),
        "questions_on_multi_object_images": multi,
        "selection_rate": selected / multi if multi else None,
        "selection_chance": chance / multi if multi else None,
        "iou_when_selected": sum(ious) / len(ious) if ious else None,
        "acc@0.5_when_selected": hits / len(ious) if ious else None,
    }


def _digit_slots(answer: str, offsets: Sequence[tuple[int, int]]) -> list[str | None]:
    """For each answer token (by character ``offsets`` into ``answer``): ``"c{coordinate}d{digit}"`` when it is one
    digit of a number inside the box, else ``None``."""
    slots: list[str | None] = []
    for start, end in offsets:
        piece = answer[start:end]
        if len(piece.strip()) != 1 or not piece.strip().isdigit() or "[" not in answer[:start]:
            slots.append(None)
            continue
        before = answer[answer.index("[") + 1 : start]
        coordinate = before.count(",")
        number = before.rsplit(",", 1)[-1]
        slots.append(f"c{coordinate}d{sum(ch.isdigit() for ch in number)}")
    return slots


def _patch_mask(box: Sequence[float], grid: int) -> torch.Tensor:
    """``(grid²,)`` bool, raster order: the patches a model-frame normalised ``xyxy`` box touches."""
    edges = torch.arange(grid, dtype=torch.float64) / grid
    x1, y1, x2, y2 = box
    columns = (edges + 1 / grid > x1) & (edges < x2)
    rows = (edges + 1 / grid > y1) & (edges < y2)
    return (rows[:, None] & columns[None, :]).flatten()


@torch.inference_mode()
def model_diagnostics(model: Any, processor: CLOCLlavaProcessor, records: Sequence[RegionTextRecord]) -> dict:
    """Teacher-forced digit accuracy and attention on the target at the first coordinate (see the module doc)."""
    codec = get_box_codec(model.config.box_codec)
    grid = model.config.image_token_grid_size
    image_token = model.config.image_token_id
    correct: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    layers = model.config.text_config.num_hidden_layers
    on_image = torch.zeros(layers, dtype=torch.float64)
    on_object = torch.zeros(layers, dtype=torch.float64)
    area = 0.0
    questions_done = 0
    for record in records:
        with Image.open(record.image_path) as opened:
            image = opened.convert("RGB")
        transform = processor.image_processor.frame_transform(*image.size)
        questions, _ = grounding_questions([record])
        for question in questions:
            prompt = prompt_text(processor, question.text)
            answer = " " + codec.encode(question.target_box)
            inputs = processor(images=[image], text=[prompt + answer], return_tensors="pt")
            inputs = inputs.to(model.device, model.dtype)
            prompt_length = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
            output = model(**inputs, output_attentions=True)
            ids = inputs["input_ids"][0].cpu()
            targets = ids[prompt_length:]
            predicted = output.logits[0, prompt_length - 1 : -1].argmax(-1).cpu()
            pieces = processor.tokenizer.convert_ids_to_tokens(targets)
            decoded = [processor.tokenizer.convert_tokens_to_string([p]) for p in pieces]
            offsets, cursor = [], 0
            text = "".join(decoded)
            for piece in decoded:
                offsets.append((cursor, cursor + len(piece)))
                cursor += len(piece)
            slots = _digit_slots(text, offsets)
            for slot, guess, target in zip(slots, predicted.tolist(), targets.tolist(), strict=True):
                if slot is not None:
                    seen[slot] += 1
                    correct[slot] += int(guess == target)
            if "c0d0" not in slots:
                continue
            writer = prompt_length - 1 + slots.index("c0d0")  # the position whose next token is x1's first digit
            image_positions = (ids == image_token).nonzero()[:, 0]
            mask = _patch_mask(transform.boxes_to_model([question.target_box])[0].tolist(), grid)
            for layer, weights in enumerate(output.attentions):
                row = weights[0, :, writer, :].double().mean(0).cpu()  # mean over heads
                image_share = row[image_positions].sum()
                on_image[layer] += image_share
                on_object[layer] += row[image_positions][mask].sum() / image_share.clamp_min(1e-12)
            area += float(mask.double().mean())
            questions_done += 1
    count = max(questions_done, 1)
    return {
        "questions": questions_done,
        "digit_accuracy": {slot: correct[slot] / seen[slot] for slot in sorted(seen)},
        "attention": [
            {"layer": layer, "on_image": float(on_image[layer] / count), "on_object": float(on_object[layer] / count)}
            for layer in range(layers)
        ],
        "object_area": area / count,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="a CLOC-LLaVA folder or a training run folder")
    parser.add_argument("--data", required=True, type=Path, help="region-text JSONL (held-out records)")
    parser.add_argument("--predictions", type=Path, help="predictions_grounding.jsonl of `python -m eval regions`")
    parser.add_argument("--images", type=int, default=80, help="records for the digit and attention diagnostics")
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="model dtype (default float32)")
    args = parser.parse_args(argv)
    folder = resolve_model_folder(args.model)
    dtype = getattr(torch, args.dtype)
    model = load_pretrained_model(folder, attn_implementation="eager", dtype=dtype, local_files_only=True)
    model = model.to(args.device).eval()
    processor = CLOCLlavaProcessor.from_pretrained(folder, local_files_only=True)
    records = read_region_text(args.data)
    report: dict[str, Any] = {"model": str(folder), "data": str(args.data)}
    if args.predictions is not None:
        report["answers"] = answer_diagnostics(records, args.predictions, model.config.box_codec)
    report.update(model_diagnostics(model, processor, records[: args.images]))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
