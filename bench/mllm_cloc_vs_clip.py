"""The paper's claim in miniature for the MLLM: a CLOC-LLaVA grounds and refers better than a CLIP-LLaVA trained
the same way.

Two vision towers, the same tiny ViT trained on the synthetic world for the same number of steps: CLOC (the shipped
recipe, ``train/configs/cloc_tiny.yaml``) and CLIP-only (the region losses off, ``max_regions_per_image=0``; its
prompter stays at its random initialisation). Each becomes a CLOC-LLaVA with the same tiny Llama, trained with the
same synthetic-world recipe (``mllm_tiny_stage1.yaml`` then ``mllm_tiny_stage2.yaml``; the tower frozen in both, or
tuned in both with ``--tune-vision-tower``), then asked the held-out grounding and referring questions of
``python -m eval regions``.

    python bench/mllm_cloc_vs_clip.py                           # ~2 x 12 minutes on 2 CPU cores
    python bench/mllm_cloc_vs_clip.py --cloc-steps 450 --stage2-steps 800
    python bench/mllm_cloc_vs_clip.py --quick                   # smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from cloc_encoder.data.format import read_region_text
from cloc_encoder.data.synthetic import SyntheticWorldConfig, generate_world
from eval.mllm_generation import GenerationSettings
from eval.regions.evaluate import evaluate_regions
from train.cloc.config import load_config
from train.cloc.pretrain import train_cloc
from train.mllm.conversations import conversations_from_records, write_conversations
from train.mllm.stages import train_stages

REPO = Path(__file__).resolve().parents[1]
TOWERS = {"CLOC": [], "CLIP-only": ["max_regions_per_image=0"]}


def pretrain_tower(world: Path, out: Path, steps: int, overrides: Sequence[str]) -> Path:
    """The tiny CLOC recipe for ``steps`` steps (from scratch, replacing an earlier run); the final checkpoint."""
    shutil.rmtree(out, ignore_errors=True)
    config = load_config(
        REPO / "train/configs/cloc_tiny.yaml",
        [
            f"train_data={world / 'train.jsonl'}",
            "val_data=null",
            f"output_dir={out}",
            f"max_steps={steps}",
            f"save_every={steps}",
            "progress_bar=false",
            "tensorboard=false",
            *overrides,
        ],
    )
    return train_cloc(config.validate()).checkpoint


def run(args: argparse.Namespace) -> list[dict]:
    world = args.out / "world"
    generate_world(SyntheticWorldConfig(), world, {"train": args.train_images, "test": args.test_images})
    train_records = read_region_text(world / "train.jsonl")
    test_records = read_region_text(world / "test.jsonl")
    conversations = world / "train_conv.json"
    samples = conversations_from_records(
        train_records, out_dir=world, tasks=["grounding", "referring"], max_turns=0, expression="random"
    )
    write_conversations(samples, conversations)
    mllm_overrides = [
        "progress_bar=false",
        "tensorboard=false",
        f"tune_vision_tower={str(args.tune_vision_tower).lower()}",
        *args.overrides,
    ]
    rows = []
    for name, tower_overrides in TOWERS.items():
        folder = args.out / name.lower().replace("-", "_")
        start = time.perf_counter()
        tower = pretrain_tower(world, folder / "encoder", args.cloc_steps, [*tower_overrides, *args.cloc_overrides])
        shutil.rmtree(folder / "mllm", ignore_errors=True)
        _, stage2 = train_stages(
            conversations,
            tower,
            folder / "mllm",
            overrides=mllm_overrides,
            stage1_overrides=[f"max_steps={args.stage1_steps}", f"save_every={args.stage1_steps}"],
            stage2_overrides=[f"max_steps={args.stage2_steps}", f"save_every={args.stage2_steps}"],
        )
        metrics = evaluate_regions(
            stage2.model.eval(),
            stage2.processor,
            test_records,
            folder / "eval",
            settings=GenerationSettings(max_new_tokens=24, batch_size=32),
            train_records=train_records,
            progress=False,
        )
        grounding, referring = metrics["grounding"], metrics["referring"]
        rows.append(
            {
                "tower": name,
                "grounding_acc@0.5": grounding["acc@0.5"],
                "grounding_miou": grounding["miou"],
                "constant_box_acc@0.5": max(b["acc@0.5"] for b in grounding["baselines"].values()),
                "referring_acc": referring["accuracy"],
                "referring_chance": referring["chance"],
                "minutes": (time.perf_counter() - start) / 60,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    lines = [
        "| vision tower | grounding Acc@0.5 (constant box) | grounding mIoU | referring acc (chance) | minutes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['tower']} | {100 * row['grounding_acc@0.5']:.1f}% ({100 * row['constant_box_acc@0.5']:.1f}%) | "
            f"{row['grounding_miou']:.3f} | {100 * row['referring_acc']:.1f}% ({100 * row['referring_chance']:.1f}%) | "
            f"{row['minutes']:.1f} |"
        )
    if len(rows) == 2 and rows[1]["grounding_acc@0.5"] > 0:
        ratio = rows[0]["grounding_acc@0.5"] / rows[1]["grounding_acc@0.5"]
        lines.append(f"\nCLOC / CLIP-only grounding Acc@0.5: {ratio:.2f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs/bench_mllm_cloc_vs_clip")
    parser.add_argument("--cloc-steps", type=int, default=450, help="encoder pretraining steps (batch 64)")
    parser.add_argument("--stage1-steps", type=int, default=100)
    parser.add_argument("--stage2-steps", type=int, default=400)
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--tune-vision-tower", action="store_true", help="tune both towers in stage 2")
    parser.add_argument("--cloc-overrides", nargs="*", default=[], help="encoder train-config key=value")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("overrides", nargs="*", help="MLLM train-config key=value for both stages and towers")
    args = parser.parse_args(argv)
    if args.quick:
        args.cloc_steps, args.stage1_steps, args.stage2_steps = 4, 2, 3
        args.train_images, args.test_images = 16, 4
        args.cloc_overrides = ["batch_size=8", *args.cloc_overrides]
        args.overrides = ["batch_size=4", *args.overrides]
    torch.manual_seed(0)
    rows = run(args)
    print(format_table(rows))
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
