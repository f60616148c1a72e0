"""The paper's claim in miniature for the MLLM, with fair arms (issue 12 §1): does a CLOC tower help a LLaVA-style
MLLM ground and refer more than a CLIP tower given the same budget and a fair way to read regions?

Per seed two towers, the same tiny ViT trained on the synthetic world for the same steps: CLOC (the shipped recipe,
``train/configs/cloc_tiny.yaml``) and CLIP-only (region losses off, ``max_regions_per_image=0``, so its prompter is
untrained). Three arms (:data:`bench.mllm_arms.ARMS`) become CLOC-LLaVAs with the same tiny Llama, trained with the
same recipe (``mllm_tiny_stage1.yaml``, then stage 2's grounding phase ``mllm_tiny_stage2_grounding.yaml`` and
mixed phase ``mllm_tiny_stage2.yaml``, plus overrides), then asked the held-out
grounding and referring questions of ``python -m eval regions`` on every test image:

- ``CLOC``: the CLOC tower's pretrained prompter feeds ``<region>``;
- ``CLIP + trained prompter``: the CLIP-only tower, its prompter trained from scratch in stages 1 and 2;
- ``CLIP + RoI features``: the CLIP-only tower, ``<region>`` = RoIAlign of its patch tokens (no prompter).

A seed sets the encoders' ``seed`` (init, data order) and the MLLM's ``init_seed`` and ``seed`` (data order); the
CLIP-only tower of a seed serves both CLIP arms. Each tower also gets ``python -m eval encoder``'s metrics.
Writes ``results.json`` and ``results.md`` (mean ± sample standard deviation over seeds, and per-seed rows).

    python -m bench.mllm_cloc_vs_clip                          # 3 seeds x (2 towers + 3 arms)
    python -m bench.mllm_cloc_vs_clip --seeds 0 --stage2-steps 800 lr=2e-4
    python -m bench.mllm_cloc_vs_clip --conversation max_turns=1 "wordings=[default]"   # other conversations
    python -m bench.mllm_cloc_vs_clip --quick                  # smoke run (tiny sizes, one seed)

Seeds can run as separate processes (on separate cores, ``OMP_NUM_THREADS=1`` each) and be joined afterwards:

    python -m bench.mllm_cloc_vs_clip --seeds 0 --out runs/bench_s0    # ... one process per seed
    python -m bench.mllm_cloc_vs_clip --merge runs/bench_s0 runs/bench_s1 runs/bench_s2 --out runs/bench

An interrupted or partial run continues with ``--resume`` (same ``--out`` and settings): the towers and arms already
in its ``results.json`` are kept, the rest are trained (``--arms CLOC`` first, then ``--resume`` for the others).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.mllm_arms import (
    ARMS,
    TOWERS,
    Arm,
    Recipe,
    Timer,
    encoder_metrics,
    format_report,
    pretrain_tower,
    prompter_change,
    summarise,
    train_arm,
)
from cloc_encoder.data.format import RegionTextRecord, atomic_write_text, read_region_text
from cloc_encoder.data.synthetic import SyntheticWorldConfig, generate_world
from cloc_encoder.run_folder import latest_checkpoint
from eval.mllm_generation import GenerationSettings
from eval.regions.evaluate import evaluate_regions
from train.mllm.conversations import ConversionReport
from train.mllm.synthetic_data import CONVERSATION_OPTIONS, MLLM_TRAIN_IMAGES, build_training_data

REPO = Path(__file__).resolve().parents[1]
QUICK = {
    "cloc_steps": 4,
    "stage1_steps": 2,
    "grounding_steps": 2,
    "stage2_steps": 3,
    "train_images": 16,
    "mllm_images": 16,
    "test_images": 4,
    "cloc_overrides": ["batch_size=8", "model_overrides.vision_config.num_hidden_layers=1"],
    "overrides": [
        "batch_size=4",
        "model_overrides.text_config.num_hidden_layers=1",
        "model_overrides.text_config.hidden_size=64",
        "model_overrides.text_config.intermediate_size=128",
    ],
}
"""``--quick``: the sizes of the smoke run (overrides go before the user's)."""


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs → dict, values read as YAML (``max_turns=1``, ``tasks=[grounding]``)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --conversation {pair!r}: expected key=value")
        options[key.strip()] = yaml.safe_load(value)
    return options


@dataclass
class Data:
    """The data every arm and seed uses: the encoder world, the MLLM conversations, the MLLM training records (for
    the constant-box baselines) and the held-out test records."""

    world: Path
    conversations: Path
    grounding: Path
    train: list[RegionTextRecord]
    test: list[RegionTextRecord]


def write_data(args: argparse.Namespace) -> Data:
    """Generate the encoder world (``train_images`` / ``test_images``) and the MLLM's training data, as the
    quickstart does (:func:`train.mllm.synthetic_data.build_training_data`: ``mllm_images`` scenes, the recipe's
    conversation options updated by ``--conversation``)."""
    world = args.out / "world"
    generate_world(SyntheticWorldConfig(), world, {"train": args.train_images, "test": args.test_images})
    report = ConversionReport()
    options = parse_options(args.conversation)
    recipe_data = build_training_data(args.out / "world_mllm", args.mllm_images, report=report, **options)
    print(report.summary(), flush=True)
    mllm_records = read_region_text(recipe_data.conversations.parent / "train.jsonl")
    test = read_region_text(world / "test.jsonl")
    return Data(world, recipe_data.conversations, recipe_data.grounding, mllm_records, test)


def evaluate_arm(stage2: Any, train: Sequence[RegionTextRecord], test: Sequence[RegionTextRecord], out: Path) -> dict:
    """Grounding and referring on every test image (``python -m eval regions``): the bench's metrics."""
    metrics = evaluate_regions(
        stage2.inference_model(),
        stage2.processor,
        test,
        out,
        settings=GenerationSettings(max_new_tokens=24, batch_size=32),
        train_records=train,
        progress=False,
    )
    grounding, referring = metrics["grounding"], metrics["referring"]
    return {
        "grounding_acc@0.5": grounding["acc@0.5"],
        "grounding_miou": grounding["miou"],
        "constant_box_acc@0.5": max(b["acc@0.5"] for b in grounding["baselines"].values()),
        "referring_acc": referring["accuracy"],
        "referring_chance": referring["chance"],
        "grounding_no_box": grounding["no_box"],
        "questions": grounding["num_questions"] + referring["num_questions"],
    }


def run_arm(arm: Arm, recipe: Recipe, tower: Path, data: Data, out: Path, seed: int) -> dict[str, Any]:
    """Train and evaluate one arm on one seed's tower; its row (``minutes``: every stage and the evaluation)."""
    shutil.rmtree(out, ignore_errors=True)  # a stale eval folder would be resumed
    timer = Timer()
    stage1, stage2 = train_arm(arm, recipe, data.conversations, tower, out / "mllm", seed, data.grounding)
    row = {"arm": arm.name, "seed": seed, "tower": arm.tower}
    row.update(evaluate_arm(stage2, data.train, data.test, out / "eval"))
    row["minutes"] = timer.minutes
    row["trainable_stage1"] = stage1.trainable_parameters
    row["trainable_stage2"] = stage2.trainable_parameters
    row["final_loss"] = stage2.metrics.get("loss")
    if stage1.trainable_parameters["vision"] or stage2.trainable_parameters["vision"]:
        row["prompter_change"] = prompter_change(tower, stage2)
    return row


def train_towers(
    args: argparse.Namespace, data: Data, seed: int, done: list[dict[str, Any]]
) -> tuple[dict[str, Path], list[dict[str, Any]]]:
    """Both towers of ``seed`` (checkpoint folders by name) and their rows: encoder metrics and pretraining minutes.
    A tower with a row in ``done`` (``--resume``) and its checkpoint in place is reused, not trained again."""
    towers, rows = {}, []
    for name, overrides in TOWERS.items():
        folder = args.out / f"seed{seed}" / "towers" / slug(name)
        row = _find(done, tower=name, seed=seed)
        checkpoint = latest_checkpoint(folder / "encoder")
        if row is not None and checkpoint is not None:
            print(f"{name} tower, seed {seed}: reusing {checkpoint}", flush=True)
            towers[name] = checkpoint
            rows.append(row)
            continue
        timer = Timer()
        options = [*overrides, *args.cloc_overrides]
        towers[name] = pretrain_tower(data.world / "train.jsonl", folder / "encoder", args.cloc_steps, seed, options)
        minutes = timer.minutes
        rows.append({"tower": name, "seed": seed, **encoder_metrics(towers[name], data.test, folder / "encoder_eval")})
        rows[-1]["minutes"] = minutes
        print(json.dumps(rows[-1]), flush=True)
    return towers, rows


def run(args: argparse.Namespace, recipe: Recipe) -> tuple[list[dict], list[dict]]:
    """Every seed: both towers, then every arm; ``(arm rows, tower rows)``, written to ``--out`` as they come.

    With ``--resume``, the rows of ``--out``'s ``results.json`` (same settings but the seeds) are kept, and the
    towers and arms they cover are not run again (an arm is run again when its tower had to be retrained)."""
    data = write_data(args)
    arm_rows, tower_rows = previous_rows(args, recipe)
    for seed in args.seeds:
        done_towers = [row for row in tower_rows if row["seed"] == seed]
        towers, rows = train_towers(args, data, seed, done_towers)
        retrained = {row["tower"] for row in rows if row not in done_towers}
        arm_rows = [row for row in arm_rows if not (row["seed"] == seed and row["tower"] in retrained)]
        tower_rows = [row for row in tower_rows if row["seed"] != seed] + rows
        write_results(args, recipe, arm_rows, tower_rows)
        for arm in ARMS:
            if args.arms and arm.name not in args.arms:
                continue
            if _find(arm_rows, arm=arm.name, seed=seed) is not None:
                print(f"{arm.name}, seed {seed}: done in an earlier run", flush=True)
                continue
            out = args.out / f"seed{seed}" / "arms" / slug(arm.name)
            arm_rows.append(run_arm(arm, recipe, towers[arm.tower], data, out, seed))
            encoder = next(row for row in rows if row["tower"] == arm.tower)
            arm_rows[-1]["encoder"] = {k: v for k, v in encoder.items() if k not in ("tower", "seed")}
            print(json.dumps(arm_rows[-1]), flush=True)
            write_results(args, recipe, arm_rows, tower_rows)
    return _ordered(arm_rows, "arm", ARMS), _ordered(tower_rows, "tower", TOWERS)


def previous_rows(args: argparse.Namespace, recipe: Recipe) -> tuple[list[dict], list[dict]]:
    """``--resume``: the arm and tower rows of ``--out``'s ``results.json`` (none without one or without
    ``--resume``). Raises ``SystemExit`` when that file was written with other settings than this run's seeds."""
    path = args.out / "results.json"
    if not args.resume or not path.is_file():
        return [], []
    previous = json.loads(path.read_text(encoding="utf-8"))
    for key, mine in (("settings", settings(args, recipe)), ("arms", arm_definitions()), ("towers", TOWERS)):
        if _comparable(previous.get(key, {})) != _comparable(mine):
            raise SystemExit(f"error: --resume: {path} was written with other {key}; use another --out")
    return previous["rows"], previous["tower_rows"]


def _find(rows: Sequence[dict], **values: Any) -> dict | None:
    return next((row for row in rows if all(row.get(k) == v for k, v in values.items())), None)


def _comparable(values: dict[str, Any]) -> Any:
    """``values`` but its ``seeds``, as JSON reads it back (tuples as lists)."""
    return json.loads(json.dumps({k: v for k, v in values.items() if k != "seeds"}))


def _ordered(rows: list[dict], key: str, names: Sequence[Any]) -> list[dict]:
    """``rows`` by seed, then in the order of ``names`` (arms or towers)."""
    order = [getattr(name, "name", name) for name in names]
    return sorted(rows, key=lambda row: (row["seed"], order.index(row[key])))


def slug(name: str) -> str:
    """A folder name: ``"CLIP + RoI features"`` → ``"clip_roi_features"``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def settings(args: argparse.Namespace, recipe: Recipe) -> dict[str, Any]:
    """What a run's numbers depend on, as ``results.json`` records it (``seeds``: this invocation's)."""
    return {
        "seeds": args.seeds,
        "cloc_steps": args.cloc_steps,
        "cloc_overrides": args.cloc_overrides,
        "train_images": args.train_images,
        "mllm_images": args.mllm_images,
        "test_images": args.test_images,
        "conversation": {**CONVERSATION_OPTIONS, **parse_options(args.conversation)},
        "recipe": {key: str(value) if isinstance(value, Path) else value for key, value in vars(recipe).items()},
    }


def arm_definitions() -> dict[str, dict[str, Any]]:
    """Each arm's tower, overrides and description, as ``results.json`` records them."""
    return {arm.name: {"tower": arm.tower, "overrides": list(arm.overrides), "about": arm.description} for arm in ARMS}


def write_results(args: argparse.Namespace, recipe: Recipe, arm_rows: list[dict], tower_rows: list[dict]) -> None:
    """``results.json`` (settings, arms, per-seed rows, summaries) and ``results.md`` (the report); ``seeds`` lists
    every seed with a row (earlier runs' too, with ``--resume``)."""
    arm_rows, tower_rows = _ordered(arm_rows, "arm", ARMS), _ordered(tower_rows, "tower", TOWERS)
    seeds = sorted({*args.seeds, *(row["seed"] for row in [*arm_rows, *tower_rows])})
    results = {
        "settings": {**settings(args, recipe), "seeds": seeds},
        "arms": arm_definitions(),
        "towers": {name: list(overrides) for name, overrides in TOWERS.items()},
        "summary": summarise(arm_rows, "arm", _metric_keys(arm_rows, "arm")),
        "tower_summary": summarise(tower_rows, "tower", _metric_keys(tower_rows, "tower")),
        "rows": arm_rows,
        "tower_rows": tower_rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=2) + "\n")  # what --resume reads
    atomic_write_text(args.out / "results.md", format_report(arm_rows, tower_rows) + "\n")


def merge_results(folders: Sequence[Path], out: Path) -> dict[str, Any]:
    """Join the ``results.json`` of runs that differ only in their seeds into one report in ``out``.

    Raises ``SystemExit`` naming the folder whose settings (other than ``seeds``) or arms differ from the first's,
    or that repeats a seed."""
    results = []
    for folder in folders:
        path = folder / "results.json"
        if not path.is_file():
            raise SystemExit(f"error: --merge: {path} does not exist")
        results.append(json.loads(path.read_text(encoding="utf-8")))
    first = results[0]
    seeds: list[int] = []
    for folder, result in zip(folders, results, strict=True):
        for key in ("settings", "arms", "towers"):
            if _comparable(result[key]) != _comparable(first[key]):
                raise SystemExit(f"error: --merge: {folder}/results.json: its {key} differ from {folders[0]}'s")
        repeated = set(seeds) & set(result["settings"]["seeds"])
        if repeated:
            raise SystemExit(f"error: --merge: {folder}/results.json repeats seed(s) {sorted(repeated)}")
        seeds += result["settings"]["seeds"]
    arm_rows = [row for result in results for row in result["rows"]]
    tower_rows = [row for result in results for row in result["tower_rows"]]
    merged = {
        **first,
        "settings": {**first["settings"], "seeds": seeds},
        "merged_from": [str(folder) for folder in folders],
        "summary": summarise(arm_rows, "arm", _metric_keys(arm_rows, "arm")),
        "tower_summary": summarise(tower_rows, "tower", _metric_keys(tower_rows, "tower")),
        "rows": arm_rows,
        "tower_rows": tower_rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(format_report(arm_rows, tower_rows) + "\n", encoding="utf-8")
    return merged


def _metric_keys(rows: Sequence[dict], key: str) -> list[tuple[str, str, bool]]:
    """The numeric fields of ``rows`` (other than ``key`` and ``seed``), as ``summarise`` takes them."""
    names = dict.fromkeys(
        name
        for row in rows
        for name, value in row.items()
        if name not in (key, "seed") and isinstance(value, (int, float)) and not isinstance(value, bool)
    )
    return [(name, name, False) for name in names]


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Recipe]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs/bench_mllm_cloc_vs_clip")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    parser.add_argument("--arms", nargs="+", choices=[arm.name for arm in ARMS], help="a subset of the arms")
    parser.add_argument("--cloc-steps", type=int, default=450, help="encoder pretraining steps (batch 64)")
    parser.add_argument("--cloc-overrides", nargs="*", default=[], help="encoder train-config key=value")
    parser.add_argument("--stage1-config", type=Path, default=Recipe.stage1_config)
    parser.add_argument("--stage2-grounding-config", type=Path, default=Recipe.stage2_grounding_config)
    parser.add_argument("--stage2-config", type=Path, default=Recipe.stage2_config)
    parser.add_argument("--stage1-steps", type=int, default=None, help="default: the stage-1 config's max_steps")
    parser.add_argument(
        "--grounding-steps",
        type=int,
        default=None,
        help="stage 2's grounding phase (default: its config's max_steps; 0: stage 2 in one run on the mixed data)",
    )
    parser.add_argument("--stage2-steps", type=int, default=None, help="default: the stage-2 config's max_steps")
    parser.add_argument("--stage1-overrides", nargs="*", default=[], help="MLLM key=value for stage 1 (all arms)")
    parser.add_argument("--stage2-overrides", nargs="*", default=[], help="MLLM key=value for stage 2 (all arms)")
    parser.add_argument("--conversation", nargs="*", default=[], help="conversation option key=value (YAML value)")
    parser.add_argument("--train-images", type=int, default=2000, help="encoder world's training images")
    parser.add_argument("--mllm-images", type=int, default=MLLM_TRAIN_IMAGES, help="MLLM training scenes")
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument(
        "--resume", action="store_true", help="keep --out's results and skip the towers and arms they hold"
    )
    parser.add_argument("--merge", type=Path, nargs="+", help="join these runs' results.json into --out (no training)")
    parser.add_argument("overrides", nargs="*", help="MLLM key=value for both stages and every arm")
    args = parser.parse_args(argv)
    if args.quick:
        quick = ("cloc_steps", "stage1_steps", "grounding_steps", "stage2_steps", "train_images", "mllm_images")
        for key in (*quick, "test_images"):
            setattr(args, key, QUICK[key])
        args.cloc_overrides = [*QUICK["cloc_overrides"], *args.cloc_overrides]
        args.overrides = [*QUICK["overrides"], *args.overrides]
    args.seeds = args.seeds if args.seeds is not None else [0] if args.quick else [0, 1, 2]
    parse_options(args.conversation)  # fail early on a malformed option
    recipe = Recipe(
        stage1_config=args.stage1_config,
        stage2_grounding_config=args.stage2_grounding_config,
        stage2_config=args.stage2_config,
        stage1_steps=args.stage1_steps,
        grounding_steps=args.grounding_steps,
        stage2_steps=args.stage2_steps,
        overrides=list(args.overrides),
        stage1_overrides=list(args.stage1_overrides),
        stage2_overrides=list(args.stage2_overrides),
    )
    return args, recipe


def main(argv: Sequence[str] | None = None) -> int:
    args, recipe = parse_args(argv)
    if args.merge:
        merged = merge_results(args.merge, args.out)
        print(format_report(merged["rows"], merged["tower_rows"]))
        print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
        return 0
    torch.manual_seed(0)
    arm_rows, tower_rows = run(args, recipe)
    print(format_report(arm_rows, tower_rows))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
