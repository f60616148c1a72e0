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
- **Grounding conversations** (:data:`GROUNDING_OPTIONS`, ``grounding_conv.json``): one grounding question per
  conversation, for the first phase of stage 2 (``mllm_tiny_stage2_grounding.yaml``): asked alone, grounding leaves
  the plateau of the coordinates' marginal distribution about twice as fast as in the mixed conversations below
  (docs/benchmarks.md, tenth round).
- **Conversations** (:data:`CONVERSATION_OPTIONS`, ``train_conv.json``): grounding and referring questions, at most
  two per conversation, of either task in either order (with the question before the image, the image tokens attend
  to the first question; a second turn teaches follow-ups, such as the demo's "Where is ...?" after "What is
  [region0]?"; docs/benchmarks.md, sixth and seventh rounds). No conversation asks twice about one object (the two
  questions of a one-object scene are two conversations), so no answer can be copied from an earlier turn (eighth
  round). Grounding is asked half in the project's words and a sixth each in Ferret's, LLaVA-1.5's and lmms-eval's
  (:data:`GROUNDING_WORDINGS`), referring half in ours and a quarter each in Ferret's and LLaVA-1.5's
  (:data:`REFERRING_WORDINGS`), with floats where a prompt asks for them, so that other harnesses' prompts get a box
  (lmms-eval's CLI, docs/benchmarks.md).

    python -m train.mllm.synthetic_data --out runs/world_mllm      # world + train_conv.json + grounding_conv.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloc_encoder.data.format import read_region_text
from cloc_encoder.data.synthetic import SyntheticWorldConfig, generate_world
from mllm.prompts import DEFAULT_WORDING
from train.mllm.conversations import ConversionReport, conversations_from_records, write_conversations

MLLM_WORLD = SyntheticWorldConfig(min_objects=1, max_objects=3, seed=1)
"""Scenes of the MLLM training data: 1–3 objects (the encoder world: 2–3), their own seed."""
MLLM_TRAIN_IMAGES = 20_000
CONVERSATIONS_FILE = "train_conv.json"
GROUNDING_CONVERSATIONS_FILE = "grounding_conv.json"
GROUNDING_WORDINGS = (DEFAULT_WORDING,) * 3 + ("ferret", "llava", "lmms_eval")
"""Grounding questions: half ours, a sixth each of Ferret's, LLaVA-1.5's and lmms-eval's (floats for the last two)."""
REFERRING_WORDINGS = (DEFAULT_WORDING,) * 2 + ("ferret", "llava")
"""Referring questions: half ours, a quarter each of Ferret's and LLaVA-1.5's (lmms-eval's is LLaVA-1.5's)."""
CONVERSATION_OPTIONS: dict[str, Any] = {
    "tasks": ("grounding", "referring"),
    "max_turns": 2,
    "mix_tasks": True,
    "expression": "random",
    "wordings": {"grounding": GROUNDING_WORDINGS, "referring": REFERRING_WORDINGS},
}
"""Options of :func:`train.mllm.conversations.conversations_from_records` for the recipe's mixed conversations."""
GROUNDING_OPTIONS: dict[str, Any] = {
    "tasks": ("grounding",),
    "max_turns": 1,
    "mix_tasks": False,
    "expression": "random",
    "wordings": {"grounding": (DEFAULT_WORDING,)},
}
"""Options of the first phase's conversations: one grounding question each, in the project's wording (the other
wordings come in the second phase)."""


@dataclass(frozen=True)
class RecipeData:
    """The conversation files of the recipe's MLLM stages, written beside the scenes they ask about."""

    conversations: Path
    """Mixed grounding and referring conversations (``train_conv.json``): stage 1 and stage 2's second phase."""
    grounding: Path
    """One grounding question per conversation (``grounding_conv.json``): stage 2's first phase."""


def build_training_data(
    out_dir: str | Path,
    images: int = MLLM_TRAIN_IMAGES,
    world: SyntheticWorldConfig = MLLM_WORLD,
    report: ConversionReport | None = None,
    grounding_report: ConversionReport | None = None,
    grounding_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> RecipeData:
    """Generate (or reuse, when up to date) the scenes under ``out_dir`` and write their conversations beside them:
    ``train_conv.json`` (:data:`CONVERSATION_OPTIONS`, overridden by ``options``; counted in ``report`` when given)
    and ``grounding_conv.json`` (:data:`GROUNDING_OPTIONS`, overridden by ``grounding_options``; counted in
    ``grounding_report``)."""
    out = Path(out_dir)
    generate_world(world, out, {"train": images})
    records = read_region_text(out / "train.jsonl")
    data = RecipeData(conversations=out / CONVERSATIONS_FILE, grounding=out / GROUNDING_CONVERSATIONS_FILE)
    for path, recipe, extra, counts in (
        (data.conversations, CONVERSATION_OPTIONS, options, report),
        (data.grounding, GROUNDING_OPTIONS, grounding_options or {}, grounding_report),
    ):
        counts = counts if counts is not None else ConversionReport()
        samples = conversations_from_records(records, out_dir=out, report=counts, **{**recipe, **extra})
        write_conversations(samples, path)
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.mllm.synthetic_data", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder (scenes and their conversations)")
    parser.add_argument("--images", type=int, default=MLLM_TRAIN_IMAGES, help="training scenes")
    args = parser.parse_args(argv)
    if args.images < 1:
        print(f"error: --images must be >= 1, got {args.images}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    report, grounding_report = ConversionReport(), ConversionReport()
    data = build_training_data(args.out, args.images, report=report, grounding_report=grounding_report)
    print(f"{CONVERSATIONS_FILE}: {report.summary()}")
    print(f"{GROUNDING_CONVERSATIONS_FILE}: {grounding_report.summary()}")
    print(f"wrote {data.conversations} and {data.grounding} ({time.perf_counter() - start:.1f}s)")
    return 0


__all__ = [
    "CONVERSATIONS_FILE",
    "CONVERSATION_OPTIONS",
    "GROUNDING_CONVERSATIONS_FILE",
    "GROUNDING_OPTIONS",
    "GROUNDING_WORDINGS",
    "MLLM_TRAIN_IMAGES",
    "MLLM_WORLD",
    "REFERRING_WORDINGS",
    "RecipeData",
    "build_training_data",
    "main",
]


if __name__ == "__main__":
    sys.exit(main())
