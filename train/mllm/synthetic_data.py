"""The MLLM training data of the synthetic-world recipe: its own world of generated scenes and their conversations.

The quickstart, the MLLM learning test and ``bench/mllm_cloc_vs_clip.py`` train on the same data, built here:

- **Scenes** (:data:`MLLM_WORLD`): 1–3 objects per image instead of the encoder world's 2–3. A third of the scenes
  hold one object, where writing the box only needs the object's place; the LLM learns to read positions off the
  image tokens there first, and to pick the described object among several on the other scenes (docs/benchmarks.md,
  "Why the shipped CLOC-LLaVA recipe grounds poorly": with 2–3 objects only it stays on the plateau of the
  coordinates' marginal distribution).
- **Many images** (:data:`MLLM_TRAIN_IMAGES`): about as many as the training steps see, so nearly every step shows
  new scenes (the generator makes 20,000 in about 30 s).
- **Held out**: the scenes come from their own seed's ``train`` stream (:data:`MLLM_WORLD` ``seed=1``), so none is
  an image of the encoder world's ``val``/``test`` splits (seed 0), which stay the held-out evaluation.
- **Conversations** (:data:`CONVERSATION_OPTIONS`): grounding and referring, at most two questions of one task per
  conversation (with the question before the image, the image tokens attend to the first question; a second turn
  teaches follow-ups; docs/benchmarks.md, sixth round), in the project's wording. :data:`MIXED_WORDINGS`
  (``--wordings`` of ``python -m train.mllm_conversations``) mixes in Ferret's, LLaVA-1.5's and lmms-eval's, with
  floats where they ask for them; at this budget it costs grounding and, in two of three runs, referring
  (docs/benchmarks.md).

    python -m train.mllm.synthetic_data --out runs/world_mllm      # world + runs/world_mllm/train_conv.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cloc_encoder.data.format import read_region_text
from cloc_encoder.data.synthetic import SyntheticWorldConfig, generate_world
from mllm.prompts import DEFAULT_WORDING, WORDINGS
from train.mllm.conversations import ConversionReport, conversations_from_records, write_conversations

MLLM_WORLD = SyntheticWorldConfig(min_objects=1, max_objects=3, seed=1)
"""Scenes of the MLLM training data: 1–3 objects (the encoder world: 2–3), their own seed."""
MLLM_TRAIN_IMAGES = 20_000
CONVERSATIONS_FILE = "train_conv.json"
CONVERSATION_OPTIONS: dict[str, Any] = {
    "tasks": ("grounding", "referring"),
    "max_turns": 2,
    "expression": "random",
    "wordings": (DEFAULT_WORDING,),
}
"""Options of :func:`train.mllm.conversations.conversations_from_records` for the recipe."""
MIXED_WORDINGS = (DEFAULT_WORDING,) * 3 + tuple(w for w in WORDINGS if w != DEFAULT_WORDING)
"""Half ours, a sixth each of Ferret's, LLaVA-1.5's and lmms-eval's: ``--wordings`` of a model that must answer
other harnesses' prompts. Not the default yet: in two of three runs it stopped the tiny model naming circles
(referring 44-45% instead of 85%; docs/benchmarks.md)."""


def build_training_data(
    out_dir: str | Path,
    images: int = MLLM_TRAIN_IMAGES,
    world: SyntheticWorldConfig = MLLM_WORLD,
    report: ConversionReport | None = None,
    **options: Any,
) -> Path:
    """Generate (or reuse, when up to date) the scenes under ``out_dir`` and write their conversations to
    ``out_dir/train_conv.json``; ``options`` override :data:`CONVERSATION_OPTIONS`, ``report`` (when given) counts
    what was converted and left out. Returns the conversations file."""
    out = Path(out_dir)
    generate_world(world, out, {"train": images})
    records = read_region_text(out / "train.jsonl")
    report = report if report is not None else ConversionReport()
    samples = conversations_from_records(records, out_dir=out, report=report, **{**CONVERSATION_OPTIONS, **options})
    path = out / CONVERSATIONS_FILE
    write_conversations(samples, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.mllm.synthetic_data", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder (scenes and train_conv.json)")
    parser.add_argument("--images", type=int, default=MLLM_TRAIN_IMAGES, help="training scenes")
    args = parser.parse_args(argv)
    if args.images < 1:
        print(f"error: --images must be >= 1, got {args.images}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    report = ConversionReport()
    path = build_training_data(args.out, args.images, report=report)
    print(report.summary())
    print(f"wrote {path} ({time.perf_counter() - start:.1f}s)")
    return 0


__all__ = [
    "CONVERSATIONS_FILE",
    "CONVERSATION_OPTIONS",
    "MLLM_TRAIN_IMAGES",
    "MLLM_WORLD",
    "build_training_data",
    "main",
]


if __name__ == "__main__":
    sys.exit(main())
