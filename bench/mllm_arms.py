"""The pieces of ``bench/mllm_cloc_vs_clip.py``: its three arms, the two towers, the two MLLM stages of an arm, the
encoder metrics of a tower, and the mean ± standard deviation report over seeds.

An arm is a vision tower plus MLLM ``key=value`` overrides that apply to both stages; everything else (the recipe
YAMLs, steps, data, LLM, seeds) is shared by all arms, so they differ only in where the ``<region>`` feature comes
from:

- ``CLOC``: the CLOC tower; its pretrained prompter feeds ``<region>`` (frozen, as the shipped recipe does).
- ``CLIP + trained prompter``: the CLIP-only tower (region losses off in pretraining, so its prompter is untrained);
  the prompter is trained from scratch with the projectors in stage 1 and with the LLM in stage 2.
- ``CLIP + RoI features``: the CLIP-only tower; ``<region>`` gets the feature layer's patch tokens RoI-aligned over
  the box (``region_feature=roi_align``, Ferret / GLaMM's region features); the prompter is unused.

A tower part that stage 1 trained (the prompter here, or the ViT with ``tune_vision_tower``) reaches stage 2 through
the pipeline: it travels in stage 1's ``mm_projector.safetensors``, which stage 2 loads on top of the tower folder.
Stage 2 runs in the recipe's two phases when the arm is given grounding conversations (grounding alone, then the
mixed conversations from that phase's whole model, tower parts included), as :func:`train.mllm.stages.train_stages`.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from cloc_encoder import CLOCModel
from cloc_encoder.data.format import RegionTextRecord
from eval.encoder.evaluate import evaluate_encoder
from mllm import CLOCVisionTower
from train.cloc.config import load_config
from train.cloc.pretrain import train_cloc
from train.mllm.config import load_mllm_config
from train.mllm.stages import TINY_STAGE1, TINY_STAGE2, TINY_STAGE2_GROUNDING, start_overrides
from train.mllm.train import MLLMTrainResult, train_mllm
from train.mllm.trainable import unwrap

REPO = Path(__file__).resolve().parents[1]
CLOC_CONFIG = REPO / "train/configs/cloc_tiny.yaml"
TOWERS = {"CLOC": (), "CLIP-only": ("max_regions_per_image=0",)}
"""Encoder pretraining overrides of each tower over ``cloc_tiny.yaml``."""


@dataclass(frozen=True)
class Arm:
    """One way to get the ``<region>`` feature: a tower of :data:`TOWERS` and MLLM overrides for both stages."""

    name: str
    tower: str
    overrides: tuple[str, ...]
    description: str


ARMS = (
    Arm("CLOC", "CLOC", (), "CLOC tower, its pretrained prompter (frozen) feeds <region>"),
    Arm(
        "CLIP + trained prompter",
        "CLIP-only",
        ("tune_prompter=true",),
        "CLIP-only tower, its untrained prompter trained from scratch in stages 1 and 2",
    ),
    Arm(
        "CLIP + RoI features",
        "CLIP-only",
        ("model_overrides.region_feature=roi_align",),
        "CLIP-only tower, <region> = RoIAlign (2x2, averaged) of the feature-layer patch tokens",
    ),
)


@dataclass
class Recipe:
    """The MLLM recipe every arm trains with: the YAMLs of stage 1 and of stage 2's two phases (grounding alone,
    then mixed) plus ``key=value`` overrides (every run, then per stage: ``stage2_overrides`` apply to both phases);
    ``None`` steps keep the YAML's ``max_steps``; ``grounding_steps=0`` trains stage 2 in one run on the mixed
    conversations (from stage 1's projector)."""

    stage1_config: Path = TINY_STAGE1
    stage2_grounding_config: Path = TINY_STAGE2_GROUNDING
    stage2_config: Path = TINY_STAGE2
    stage1_steps: int | None = None
    grounding_steps: int | None = None
    stage2_steps: int | None = None
    overrides: list[str] = field(default_factory=list)
    stage1_overrides: list[str] = field(default_factory=list)
    stage2_overrides: list[str] = field(default_factory=list)

    def stage(self, number: int, seed: int, arm: Arm, paths: Sequence[str], *, grounding: bool = False) -> list[str]:
        """Overrides of stage ``number`` (``grounding``: stage 2's first phase) of ``arm`` for ``seed``: seeds,
        steps, the user's, the arm's, then the bench's ``paths`` (data, tower, output folder, starting point)."""
        steps = self.stage1_steps if number == 1 else self.grounding_steps if grounding else self.stage2_steps
        step_overrides = [] if steps is None else [f"max_steps={steps}", f"save_every={steps}"]
        per_stage = self.stage1_overrides if number == 1 else self.stage2_overrides
        return [
            "progress_bar=false",
            "tensorboard=false",
            f"init_seed={seed}",
            f"seed={seed}",
            *step_overrides,
            *self.overrides,
            *per_stage,
            *arm.overrides,
            *paths,
        ]


def pretrain_tower(train_data: Path, out: Path, steps: int, seed: int, overrides: Sequence[str]) -> Path:
    """The tiny CLOC recipe for ``steps`` steps from ``seed`` (init and data order), replacing an earlier run; the
    final checkpoint folder."""
    shutil.rmtree(out, ignore_errors=True)
    config = load_config(
        CLOC_CONFIG,
        [
            f"train_data={train_data}",
            "val_data=null",
            f"output_dir={out}",
            f"max_steps={steps}",
            f"save_every={steps}",
            "progress_bar=false",
            "tensorboard=false",
            f"seed={seed}",
            *overrides,
        ],
    )
    return train_cloc(config.validate()).checkpoint


def encoder_metrics(checkpoint: Path, records: Sequence[RegionTextRecord], out: Path) -> dict[str, float | None]:
    """The tower's encoder metrics (``python -m eval encoder``'s :func:`evaluate_encoder`, written to
    ``out/metrics.json``): region classification accuracy / mean class accuracy, region↔text and image↔text R@1,
    and the box head's text → box Acc@0.5."""
    model = CLOCModel.from_pretrained(checkpoint).eval()
    metrics = evaluate_encoder(model, AutoTokenizer.from_pretrained(checkpoint), records, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    classification = metrics["region_classification"] or {}
    regions = metrics["region_text_retrieval"] or {}
    images = metrics["image_text_retrieval"] or {}
    grounding = metrics["grounding"] or {}
    image_r1 = [images[key]["R@1"] for key in ("image_to_text", "text_to_image") if key in images]
    return {
        "region_cls_acc": classification.get("accuracy"),
        "region_cls_macc": classification.get("mean_class_accuracy"),
        "text_to_region_R@1": regions.get("text_to_region", {}).get("R@1"),
        "region_to_text_R@1": regions.get("region_to_text", {}).get("R@1"),
        "image_text_R@1": sum(image_r1) / len(image_r1) if image_r1 else None,
        "box_head_acc@0.5": grounding.get("acc@0.5"),
    }


def prompter_change(tower: Path, stage2: MLLMTrainResult) -> float:
    """Relative L2 change of the prompter's weights from ``tower`` to the end of stage 2 (0: untouched)."""
    before = CLOCVisionTower.from_cloc(tower).prompter.state_dict()
    after = unwrap(stage2.model).model.vision_tower.prompter.state_dict()
    delta = sum(float((after[k].float().cpu() - v.float()).pow(2).sum()) for k, v in before.items())
    norm = sum(float(v.float().pow(2).sum()) for v in before.values())
    return math.sqrt(delta / max(norm, 1e-12))


def train_arm(
    arm: Arm,
    recipe: Recipe,
    conversations: Path,
    tower: Path,
    out: Path,
    seed: int,
    grounding: Path | None = None,
) -> tuple[MLLMTrainResult, MLLMTrainResult]:
    """The MLLM stages of ``arm`` on ``tower``: stage 1 on ``conversations`` into ``out/stage1``; with
    ``grounding`` (and ``recipe.grounding_steps`` not 0) stage 2's grounding phase on it into
    ``out/stage2_grounding``; stage 2 on ``conversations`` into ``out/stage2``, from the grounding phase's model or
    else from the tower and stage 1's projector file (which carries any tower part stage 1 trained). Returns stage 1
    and the final run."""
    tower_path = f"vision_tower={tower}"
    paths1 = [f"train_data={conversations}", tower_path, f"output_dir={out / 'stage1'}"]
    stage1 = train_mllm(load_mllm_config(recipe.stage1_config, recipe.stage(1, seed, arm, paths1)).validate())
    start = start_overrides(tower, stage1)
    if grounding is not None and recipe.grounding_steps != 0:
        paths = [f"train_data={grounding}", *start, f"output_dir={out / 'stage2_grounding'}"]
        config = load_mllm_config(recipe.stage2_grounding_config, recipe.stage(2, seed, arm, paths, grounding=True))
        start = start_overrides(tower, stage1, train_mllm(config.validate()))
    paths2 = [f"train_data={conversations}", *start, f"output_dir={out / 'stage2'}"]
    stage2 = train_mllm(load_mllm_config(recipe.stage2_config, recipe.stage(2, seed, arm, paths2)).validate())
    return stage1, stage2


class Timer:
    """Minutes since construction."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def minutes(self) -> float:
        return (time.perf_counter() - self.start) / 60


# ----- the report ----------------------------------------------------------------------------------------------------

ARM_METRICS = (
    ("grounding_acc@0.5", "grounding Acc@0.5", True),
    ("grounding_miou", "grounding mIoU", False),
    ("constant_box_acc@0.5", "best constant box Acc@0.5", True),
    ("referring_acc", "referring acc", True),
    ("referring_chance", "referring chance", True),
    ("minutes", "MLLM minutes (train + eval)", False),
)
"""``(key, column, percent)`` of the per-arm table."""
ENCODER_METRICS = (
    ("region_cls_acc", "region cls acc", True),
    ("region_cls_macc", "region cls mAcc", True),
    ("text_to_region_R@1", "text→region R@1", True),
    ("region_to_text_R@1", "region→text R@1", True),
    ("image_text_R@1", "image-text R@1", True),
    ("box_head_acc@0.5", "box head Acc@0.5", True),
    ("minutes", "pretraining minutes", False),
)
"""``(key, column, percent)`` of the per-tower table."""


def mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (``None`` below two values) of the values that are not ``None``."""
    present = [float(v) for v in values if v is not None]
    return {
        "mean": statistics.fmean(present) if present else None,
        "std": statistics.stdev(present) if len(present) > 1 else None,
        "n": len(present),
    }


def summarise(rows: Sequence[dict[str, Any]], key: str, metrics: Sequence[tuple[str, str, bool]]) -> dict:
    """``{rows[key]: {metric: mean_std}}`` over the rows (seeds) of each value of ``key``, in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return {name: {m: mean_std([r.get(m) for r in group]) for m, _, _ in metrics} for name, group in groups.items()}


def _cell(value: float | None, std: float | None, percent: bool) -> str:
    if value is None:
        return "n/a"
    scale, digits = (100.0, 1) if percent else (1.0, 3)
    text = f"{scale * value:.{digits}f}"
    if std is not None:
        text += f" ± {scale * std:.{digits}f}"
    return text + ("%" if percent else "")


def _table(title: str, summary: dict, metrics: Sequence[tuple[str, str, bool]]) -> list[str]:
    lines = [f"| {title} | seeds | " + " | ".join(column for _, column, _ in metrics) + " |"]
    lines.append("| --- " * (len(metrics) + 2) + "|")
    for name, values in summary.items():
        seeds = max(entry["n"] for entry in values.values())
        cells = [_cell(values[m]["mean"], values[m]["std"], percent) for m, _, percent in metrics]
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    return lines


PAIRED_METRICS = (
    ("grounding_acc@0.5", "grounding Acc@0.5", True),
    ("grounding_miou", "grounding mIoU", False),
    ("referring_acc", "referring acc", True),
)
"""``(key, column, percent)`` of the paired-difference table."""


def paired_differences(arm_rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines: each arm minus the first arm on the same seed (seeds pair data order and MLLM init), mean ±
    sample standard deviation over the seeds both ran; empty with fewer than two arms."""
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for row in arm_rows:
        by_arm.setdefault(row["arm"], {})[row["seed"]] = row
    if len(by_arm) < 2:
        return []
    reference, *others = by_arm
    lines = ["", f"Paired differences against {reference} (same seed; mean ± sample std over seeds):", ""]
    lines += ["| arm | seeds | " + " | ".join(f"Δ {column}" for _, column, _ in PAIRED_METRICS) + " |"]
    lines.append("| --- " * (len(PAIRED_METRICS) + 2) + "|")
    for arm in others:
        seeds = sorted(set(by_arm[arm]) & set(by_arm[reference]))
        cells = []
        for key, _, percent in PAIRED_METRICS:
            stats = mean_std([_difference(by_arm[arm][s].get(key), by_arm[reference][s].get(key)) for s in seeds])
            cells.append(_cell(stats["mean"], stats["std"], percent).replace("%", " pt"))  # points, not percent
        lines.append(f"| {arm} | {len(seeds)} | " + " | ".join(cells) + " |")
    return lines


def _difference(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference


def format_report(arm_rows: Sequence[dict[str, Any]], tower_rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per arm and per tower mean ± sample standard deviation over seeds, then the per-seed rows."""
    lines = ["MLLM arms (mean ± sample std over seeds):", ""]
    lines += _table("arm", summarise(arm_rows, "arm", ARM_METRICS), ARM_METRICS)
    lines += ["", "Vision towers, encoder metrics (`python -m eval encoder`):", ""]
    lines += _table("tower", summarise(tower_rows, "tower", ENCODER_METRICS), ENCODER_METRICS)
    lines += paired_differences(arm_rows)
    lines += ["", "Per seed:", ""]
    lines += ["| arm | seed | " + " | ".join(column for _, column, _ in ARM_METRICS) + " |"]
    lines.append("| --- " * (len(ARM_METRICS) + 2) + "|")
    for row in arm_rows:
        cells = [_cell(row.get(m), None, percent) for m, _, percent in ARM_METRICS]
        lines.append(f"| {row['arm']} | {row['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "ARMS",
    "TOWERS",
    "Arm",
    "Recipe",
    "Timer",
    "encoder_metrics",
    "format_report",
    "mean_std",
    "pretrain_tower",
    "prompter_change",
    "summarise",
    "train_arm",
]
