"""Stage-2 training speed of the synthetic-world recipe's layouts, on its real conversations and tower.

Each variant is a short stage-2 run of ``train.mllm_train`` (``mllm_tiny_stage2_grounding.yaml``, the recipe's
stage-2 settings from a tower, with overrides, a fresh projector, nothing saved) on the same machine, one after the
other, over ``--rounds`` rounds so that a noisy machine hits every variant alike. Reported per variant: median
seconds per optimizer step and questions trained per second (a conversation's assistant answers), and the ratio of
questions/s to the first variant measured in the same run.

    python -m bench.recipe_step --tower runs/cloc_tiny --data runs/world_mllm            # the layouts, fp32
    python -m bench.recipe_step --tower runs/cloc_tiny --data runs/world_mllm --bf16     # and bf16 autocast
    python -m bench.recipe_step --tower runs/cloc_tiny --data runs/world_mllm --layouts shipped \
        --precision bf16 --attn sdpa eager                 # the shipped two phases under two attention kernels

``--data`` is a folder of ``train.mllm.synthetic_data`` (its ``train.jsonl`` scenes); the conversations of each
layout are written under ``--out``. ``--bf16`` adds each layout under CPU bf16 autocast: fast only on CPUs with
native bf16 matrix units (AMX / AVX512-BF16), much slower elsewhere. ``--attn`` times each variant under each
attention implementation (``attn_implementation``, in the order given). Two ratios of questions/s: against the
first row, and against the first row of the same layout (what a precision or attention kernel changes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cloc_encoder.data.format import read_region_text
from train.mllm.config import load_mllm_config
from train.mllm.conversations import conversations_from_records, write_conversations
from train.mllm.synthetic_data import CONVERSATION_OPTIONS, GROUNDING_OPTIONS
from train.mllm.train import train_mllm

STAGE2_CONFIG = "train/configs/mllm_tiny_stage2_grounding.yaml"


@dataclass(frozen=True)
class Layout:
    """One way of laying out the recipe's stage 2: questions per conversation (``max_turns``, 0 = all of a task), the
    chat template, patches merged per image token side, the batch size, whether a conversation may ask questions
    of both tasks (``mix_tasks``), and whether it is the grounding phase's data (:data:`GROUNDING_OPTIONS`, else
    :data:`CONVERSATION_OPTIONS`)."""

    name: str
    max_turns: int
    chat_template: str
    image_token_merge: int
    batch_size: int
    mix_tasks: bool = False
    grounding_phase: bool = False

    @property
    def overrides(self) -> list[str]:
        """The layout as ``train.mllm_train`` overrides."""
        return [
            f"chat_template={self.chat_template}",
            f"model_overrides.image_token_merge={self.image_token_merge}",
            f"batch_size={self.batch_size}",
        ]


LAYOUTS = (
    Layout("image first, all questions of an image per conversation, 64 image tokens, batch 32 (until session 21)",
           0, "vicuna_v1", 1, 32),
    Layout("question first, one question per conversation, 64 image tokens, batch 48", 1, "instruction_first", 1, 48),
    Layout("question first, one question per conversation, 2 x 2 merged image tokens (16), batch 48",
           1, "instruction_first", 2, 48),
    Layout("question first, up to two questions of one task per conversation, 2 x 2 merged image tokens (16), "
           "batch 48 (session 21)", 2, "instruction_first", 2, 48),
    Layout("question first, up to two questions of either task per conversation, 2 x 2 merged image tokens (16), "
           "batch 48 (shipped: the mixed phase)", 2, "instruction_first", 2, 48, mix_tasks=True),
)  # fmt: skip
GROUNDING_PHASE = Layout(
    "question first, one grounding question per conversation in our wording, 2 x 2 merged image tokens (16), "
    "batch 48 (shipped: the grounding phase)", 1, "instruction_first", 2, 48, grounding_phase=True,
)  # fmt: skip
LAYOUT_SETS = {"all": (*LAYOUTS, GROUNDING_PHASE), "shipped": (GROUNDING_PHASE, LAYOUTS[-1])}
"""``--layouts``: every layout, or the two phases of the shipped stage 2."""


@dataclass
class Timing:
    """What the runs of one variant measured."""

    name: str
    questions_per_conversation: float
    layout: str
    """The layout's name (rows of one layout share a baseline)."""
    step_s: list[float] = field(default_factory=list)
    questions_per_s: list[float] = field(default_factory=list)


def _conversations(data: Path, out: Path, layout: Layout) -> tuple[Path, float]:
    """The layout's conversation file under ``out`` and its mean answers per conversation."""
    kind = "_grounding" if layout.grounding_phase else "_mixed" if layout.mix_tasks else ""
    path = out / f"train_conv_turns{layout.max_turns}{kind}.json"
    # the recipe's conversations (its wordings) but for the layout
    recipe = GROUNDING_OPTIONS if layout.grounding_phase else CONVERSATION_OPTIONS
    options = {**recipe, "max_turns": layout.max_turns, "mix_tasks": layout.mix_tasks}
    samples = conversations_from_records(read_region_text(data / "train.jsonl"), out_dir=data, **options)
    write_conversations(samples, path)
    answers = [sum(turn["from"] == "gpt" for turn in sample["conversations"]) for sample in samples]
    return path, statistics.mean(answers)


def _time_variant(timing: Timing, config_overrides: list[str], steps: int, warmup: int) -> None:
    with tempfile.TemporaryDirectory(prefix="recipe_step_") as out:
        config = load_mllm_config(
            STAGE2_CONFIG,
            [*config_overrides, f"output_dir={out}", f"max_steps={steps}", "log_every=1", f"save_every={steps}",
             "progress_bar=false", "tensorboard=false", "keep_last=1"],
        )  # fmt: skip
        config.pretrain_mm_projector = None
        result = train_mllm(config)
    rows = [row for row in result.log_history if "samples_per_s" in row and row["step"] > warmup]
    batch = config.batch_size
    step_s = statistics.median(batch / row["samples_per_s"] for row in rows)
    timing.step_s.append(step_s)
    timing.questions_per_s.append(batch * timing.questions_per_conversation / step_s)


def run(
    tower: Path,
    data: Path,
    out: Path,
    steps: int,
    rounds: int,
    precisions: Sequence[str] = ("fp32",),
    attention: Sequence[str] = ("sdpa",),
    layouts: Sequence[Layout] = LAYOUTS,
) -> list[dict]:
    """Time every layout under every precision and attention implementation; rows in that nested order."""
    out.mkdir(parents=True, exist_ok=True)
    variants: list[tuple[Timing, list[str]]] = []
    for layout in layouts:
        path, per_conversation = _conversations(data, out, layout)
        common = [f"train_data={path}", f"image_folder={data}", f"vision_tower={tower}", *layout.overrides]
        for precision in precisions:
            for attn in attention:
                name = f"{layout.name}, {precision}, {attn} attention"
                overrides = [*common, f"precision={precision}", f"attn_implementation={attn}"]
                variants.append((Timing(name, per_conversation, layout.name), overrides))
    for round_index in range(rounds):
        for timing, overrides in variants:
            start = time.perf_counter()
            _time_variant(timing, overrides, steps, warmup=max(2, steps // 5))
            print(f"round {round_index + 1}/{rounds} {timing.name}: {timing.step_s[-1]:.3f} s/step "
                  f"({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)  # fmt: skip
    baseline = statistics.median(variants[0][0].questions_per_s)
    layout_baseline: dict[str, float] = {}  # each layout's first variant (precision, attention)
    for timing, _ in variants:
        layout_baseline.setdefault(timing.layout, statistics.median(timing.questions_per_s))
    rows = []
    for timing, _ in variants:
        questions_per_s = statistics.median(timing.questions_per_s)
        rows.append({
            "variant": timing.name,
            "questions_per_conversation": round(timing.questions_per_conversation, 3),
            "step_s": round(statistics.median(timing.step_s), 4),
            "questions_per_s": round(questions_per_s, 2),
            "ratio_vs_first": round(questions_per_s / baseline, 3),
            "ratio_vs_layout_first": round(questions_per_s / layout_baseline[timing.layout], 3),
            "rounds": rounds,
        })  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.recipe_step", description=__doc__.split("\n")[0])
    parser.add_argument("--tower", required=True, type=Path, help="CLOC tower folder (runs/cloc_tiny)")
    parser.add_argument("--data", required=True, type=Path, help="train.mllm.synthetic_data folder (runs/world_mllm)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_recipe_step"))
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per timed run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="also time each layout under bf16 autocast")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), help="precisions to time (default fp32)")
    parser.add_argument("--attn", nargs="+", default=["sdpa"], choices=("sdpa", "eager"),
                        help="attention implementations to time (default sdpa)")  # fmt: skip
    parser.add_argument("--layouts", choices=sorted(LAYOUT_SETS), default="all",
                        help="every layout, or the shipped stage 2's two phases")  # fmt: skip
    args = parser.parse_args(argv)
    if args.steps < 5 or args.rounds < 1:
        parser.error("--steps must be >= 5 and --rounds >= 1")
    if args.bf16 and args.precision:
        parser.error("give --bf16 or --precision, not both")
    precisions = args.precision or (["fp32", "bf16"] if args.bf16 else ["fp32"])
    rows = run(args.tower, args.data, args.out, args.steps, args.rounds, precisions, args.attn,
               LAYOUT_SETS[args.layouts])  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print("| variant | answers per conversation | s / step | questions / s | ratio vs first row | ratio vs its "
          "layout's first row |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['variant']} | {row['questions_per_conversation']:.2f} | {row['step_s']:.3f} | "
              f"{row['questions_per_s']:.1f} | {row['ratio_vs_first']:.2f} | "
              f"{row['ratio_vs_layout_first']:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
