"""CLOC (prompter) against a CLIP-only encoder at the same training budget: the paper's Table 2 in miniature.

All encoders are the same tiny CLIP-layout model trained on the synthetic world for the same number of steps: CLOC
with the prompter's average pool over the prompt positions (the default) or over all tokens, and a CLIP-only one
with the region losses off (``max_regions_per_image=0``, so ``λ = 0``). The CLIP-only encoder gets
region embeddings the two ways a CLIP user would:

- **crop**: cut each box out of the original image, preprocess it like a whole image, re-encode it with the ViT;
- **RoI pool**: average the ViT's final patch tokens whose centres fall inside the box (model frame), through the
  tower's final norm and projection (the "dense CLIP" trick).

Tasks, on the held-out test split: zero-shot region classification (mean per-class accuracy over the 12 colour ×
shape classes, chance 8.3%); referring expressions that need context (relations and superlatives such as "the
small blue square left of the circle"): pick the referred object among the image's boxes (accuracy; chance is
1/number of objects) and text→region R@1 over every region of the split; image-text retrieval R@1.

    python bench/cloc_vs_clip.py --steps 800                 # ~2 × 6 minutes on 2 CPU cores
    python bench/cloc_vs_clip.py --quick                     # smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from transformers import AutoTokenizer

from cloc_encoder import CLOCModel
from cloc_encoder.data.format import RegionTextRecord, read_region_text
from cloc_encoder.data.synthetic import SyntheticWorldConfig, generate_world
from cloc_encoder.data.synthetic_language import is_relational
from cloc_encoder.image_processing import CLOCImageProcessor
from eval.encoder.evaluate import DEFAULT_CLASS_PROMPT, encode_texts
from eval.encoder.metrics import region_classification, retrieval_recall
from train.cloc.config import load_config
from train.cloc.pretrain import train_cloc

REPO = Path(__file__).resolve().parents[1]
RegionEncoder = Callable[[CLOCModel, CLOCImageProcessor, RegionTextRecord], torch.Tensor]


@dataclass
class Encoded:
    """Everything the metrics need for one (model, region method) pair; rows follow the test records' regions."""

    region_embeds: torch.Tensor  # (R, D)
    region_image: list[int]  # image of each region
    image_embeds: torch.Tensor  # (N, D)


def _load_image(record: RegionTextRecord) -> Image.Image:
    with Image.open(record.image_path) as image:
        return image.convert("RGB")


@torch.inference_mode()
def prompter_regions(model: CLOCModel, processor: CLOCImageProcessor, record: RegionTextRecord) -> torch.Tensor:
    """CLOC: one ViT pass, the prompter for every box. ``(R_i, D)``."""
    batch = processor([_load_image(record)], boxes=[[region.box for region in record.regions]])
    state = model.encode_images(batch["pixel_values"])
    return model.region_embeddings(state, batch["boxes"])


@torch.inference_mode()
def crop_regions(model: CLOCModel, processor: CLOCImageProcessor, record: RegionTextRecord) -> torch.Tensor:
    """CLIP-only: crop each box from the original image and re-encode it. ``(R_i, D)``."""
    image = _load_image(record)
    crops = []
    for region in record.regions:
        x1, y1, x2, y2 = region.box
        left, top = int(np.floor(x1 * image.width)), int(np.floor(y1 * image.height))
        right, bottom = int(np.ceil(x2 * image.width)), int(np.ceil(y2 * image.height))
        crops.append(image.crop((left, top, max(right, left + 1), max(bottom, top + 1))))
    return model.get_image_features(processor(crops)["pixel_values"])


@torch.inference_mode()
def roi_pool_regions(model: CLOCModel, processor: CLOCImageProcessor, record: RegionTextRecord) -> torch.Tensor:
    """CLIP-only: average the final patch tokens inside each model-frame box, then norm + projection. ``(R_i, D)``."""
    batch = processor([_load_image(record)], boxes=[[region.box for region in record.regions]])
    patches = model.encode_images(batch["pixel_values"]).patch_tokens[0]  # (P, W), CLS removed
    side = round(patches.shape[0] ** 0.5)
    centres = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    centre_y, centre_x = torch.meshgrid(centres, centres, indexing="ij")
    centre_x, centre_y = centre_x.flatten(), centre_y.flatten()
    pooled = []
    for x1, y1, x2, y2 in batch["boxes"][0].tolist():
        inside = (centre_x >= x1) & (centre_x <= x2) & (centre_y >= y1) & (centre_y <= y2)
        if not bool(inside.any()):  # a box smaller than a patch: take the patch holding its centre
            inside = ((centre_x - (x1 + x2) / 2) ** 2 + (centre_y - (y1 + y2) / 2) ** 2).argmin() == torch.arange(
                len(centre_x)
            )
        pooled.append(patches[inside].mean(dim=0))
    tokens = model.vision_model.post_layernorm(torch.stack(pooled))
    return model.visual_projection(tokens)


def encode_split(
    model: CLOCModel, processor: CLOCImageProcessor, records: Sequence[RegionTextRecord], regions: RegionEncoder
) -> Encoded:
    """Region and image embeddings of every test record with one region method."""
    region_embeds, region_image, image_embeds = [], [], []
    with torch.inference_mode():
        for index, record in enumerate(records):
            region_embeds.append(regions(model, processor, record))
            region_image.extend([index] * len(record.regions))
            image_embeds.append(model.get_image_features(processor([_load_image(record)])["pixel_values"]))
    return Encoded(torch.cat(region_embeds), region_image, torch.cat(image_embeds))


def score(model: CLOCModel, tokenizer, records: Sequence[RegionTextRecord], encoded: Encoded) -> dict[str, float]:
    """The four numbers of the table for one (model, region method) pair."""
    regions = [region for record in records for region in record.regions]
    classes = sorted({region.category for region in regions})
    class_embeds, _ = encode_texts(model, tokenizer, [DEFAULT_CLASS_PROMPT.format(name) for name in classes])
    labels = [classes.index(region.category) for region in regions]
    classification = region_classification(encoded.region_embeds, class_embeds, labels)

    queries, targets = [], []
    for row, region in enumerate(regions):
        for expression in region.expressions:
            if is_relational(expression):
                queries.append(expression)
                targets.append(row)
    query_embeds = F.normalize(encode_texts(model, tokenizer, queries)[0], dim=-1)
    region_embeds = F.normalize(encoded.region_embeds.float(), dim=-1)
    image_of = torch.tensor(encoded.region_image)
    correct = []
    for query, target in zip(query_embeds, targets, strict=True):
        candidates = (image_of == image_of[target]).nonzero().squeeze(1)
        correct.append(int(candidates[(region_embeds[candidates] @ query).argmax()]) == target)
    chance = float(np.mean([1.0 / int((image_of == image_of[t]).sum()) for t in targets]))
    global_recall = retrieval_recall(query_embeds, region_embeds, [[t] for t in targets], ks=(1,))

    caption_embeds, _ = encode_texts(model, tokenizer, [record.caption for record in records])
    diagonal = [[i] for i in range(len(records))]
    image_to_text = retrieval_recall(encoded.image_embeds, caption_embeds, diagonal, ks=(1,))["R@1"]
    text_to_image = retrieval_recall(caption_embeds, encoded.image_embeds, diagonal, ks=(1,))["R@1"]
    return {
        "region_cls_macc": classification["mean_class_accuracy"],
        "context_expr_in_image_acc": float(np.mean(correct)) if correct else float("nan"),
        "context_expr_in_image_chance": chance,
        "context_expr_R@1": global_recall["R@1"],
        "image_text_R@1": (image_to_text + text_to_image) / 2,
        "num_context_expressions": len(queries),
    }


def train(world: Path, out: Path, name: str, steps: int, overrides: Sequence[str]) -> Path:
    """Train the tiny preset on the world from scratch (replacing an earlier run); returns the final checkpoint."""
    shutil.rmtree(out / name, ignore_errors=True)
    config = load_config(
        REPO / "train/configs/cloc_tiny.yaml",
        [
            f"train_data={world / 'train.jsonl'}",
            "val_data=null",
            f"output_dir={out / name}",
            f"max_steps={steps}",
            "progress_bar=false",
            "tensorboard=false",
            f"save_every={steps}",
            *overrides,
        ],
    )
    result = train_cloc(config.validate())
    print(f"[{name}] {result.step} steps in {result.elapsed_s / 60:.1f} min: {json.dumps(result.metrics)}", flush=True)
    return result.checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs/bench_cloc_vs_clip")
    parser.add_argument("--steps", type=int, default=800, help="training steps for each encoder (batch 64)")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (20 steps, 64/16 images)")
    parser.add_argument("overrides", nargs="*", help="extra train-config key=value for both runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.train_images, args.test_images = 20, 64, 16
        args.overrides = ["batch_size=16", *args.overrides]
    torch.manual_seed(0)
    world = args.out / "world"
    generate_world(SyntheticWorldConfig(), world, {"train": args.train_images, "test": args.test_images})
    records = read_region_text(world / "test.jsonl")

    start = time.perf_counter()
    runs = {  # name: (train-config overrides, region methods)
        "CLOC (pool prompts)": (["model_overrides.prompter_pool=prompts"], {"prompter": prompter_regions}),
        "CLOC (pool all)": (["model_overrides.prompter_pool=all"], {"prompter": prompter_regions}),
        "CLIP-only": (["max_regions_per_image=0"], {"crop": crop_regions, "RoI pool": roi_pool_regions}),
    }
    rows = []
    for index, (name, (overrides, methods)) in enumerate(runs.items()):
        checkpoint = train(world, args.out, f"run{index}", args.steps, [*overrides, *args.overrides])
        model = CLOCModel.from_pretrained(checkpoint).eval()
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        processor = CLOCImageProcessor.for_model(model.config)
        for method, regions in methods.items():
            metrics = score(model, tokenizer, records, encode_split(model, processor, records, regions))
            rows.append({"encoder": name, "regions": method, **metrics})

    print(f"\n{args.steps} steps each, batch 64, {len(records)} test images ({time.perf_counter() - start:.0f} s)\n")
    print(
        "| encoder | region embedding | region cls (mAcc) | context expr. in-image acc (chance) | "
        "context expr. R@1 | image-text R@1 |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['encoder']} | {row['regions']} | {100 * row['region_cls_macc']:.1f}% | "
            f"{100 * row['context_expr_in_image_acc']:.1f}% ({100 * row['context_expr_in_image_chance']:.0f}%) | "
            f"{100 * row['context_expr_R@1']:.1f}% | {100 * row['image_text_R@1']:.1f}% |"
        )
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
