"""Region embeddings per second: encode once and prompt many, against crop-and-re-encode (issue 2, section 7).

For ``R`` boxes on one image it times, in the same process and on the same randomly initialised encoder:

- the ViT pass (``encode_images``, one image);
- the prompter with ``prompter_pool="prompts"`` (shared image keys/values, only the prompt positions computed);
- the prompter with ``prompter_pool="all"`` (the plain layer over ``[prompts; all image tokens]`` per box);
- crop-and-re-encode: each box cropped from the model input and resized to the input size (``roi_align``,
  bilinear), then the ``R`` crops encoded by the same ViT in one batch.

End-to-end speed-ups divide the crop-and-re-encode time by (ViT pass + prompter). With ``L`` ViT layers and a
prompter layer as wide as one of them, the all-token mode costs about ``(1 + R/L)`` ViT passes against ``R``, so
its speed-up is bounded by ``L·R/(L+R)`` (``12R/(12+R)`` for ViT-B/16). Boxes are model-frame ``xyxy`` in
``[0, 1]``. Run::

    python -m bench.region_embed                # ViT-B/16 at 224 px, 1/4/16/64 boxes (minutes on 2 CPU cores)
    python -m bench.region_embed --quick        # tiny preset, smoke run (seconds)

On a machine whose cores are busy with other work, pass ``--threads 1``: a multi-threaded pass waits for its
slowest thread, and timings swing by 100x (measured on a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchvision.ops import roi_align

from cloc_encoder.factory import preset_config
from cloc_encoder.modeling_cloc import CLOCModel

DEFAULT_BOX_COUNTS = (1, 4, 16, 64)
TARGETS = {16: 12.0, 64: 45.0}
"""Issue 2's targets: end-to-end speed-up of the prompts path over crop-and-re-encode at these box counts."""
BOUND_TOLERANCE = 0.10
"""The all-token mode should come within this fraction of its FLOP bound ``L·R/(L+R)`` (not fall below
``1 - BOUND_TOLERANCE`` of it; a ratio above 1 means the crop baseline costs more than its FLOPs predict)."""


@dataclass(frozen=True)
class BenchRow:
    """Median milliseconds for ``boxes`` regions on one image (``layers`` = ViT depth, for the FLOP bound)."""

    boxes: int
    layers: int
    vit_ms: float
    prompts_ms: float
    all_ms: float
    crop_ms: float

    @property
    def speedup_prompts(self) -> float:
        """Crop-and-re-encode time over (ViT pass + prompts-mode prompter)."""
        return self.crop_ms / (self.vit_ms + self.prompts_ms)

    @property
    def speedup_all(self) -> float:
        """Crop-and-re-encode time over (ViT pass + all-token prompter)."""
        return self.crop_ms / (self.vit_ms + self.all_ms)

    @property
    def bound_all(self) -> float:
        """``L·R/(L+R)``: the all-token mode's FLOP bound on the speed-up."""
        return self.layers * self.boxes / (self.layers + self.boxes)


def median_ms(functions: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median wall time in milliseconds of each function over ``repeats`` rounds, after ``warmup`` rounds.

    Each round runs every function once, in turn, so all of them see the same machine load (on a shared machine
    a slow spell then slows every path alike instead of skewing one ratio).
    """
    for _ in range(warmup):
        for function in functions.values():
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in times.items()}


def random_boxes(count: int, generator: torch.Generator, min_size: float = 0.1) -> torch.Tensor:
    """``(count, 4)`` model-frame ``xyxy`` boxes in ``[0, 1]``, each side at least ``min_size``."""
    size = min_size + (1.0 - min_size) * torch.rand(count, 2, generator=generator)
    corner = (1.0 - size) * torch.rand(count, 2, generator=generator)
    return torch.cat([corner, corner + size], dim=1)


def build_models(preset: str, seed: int = 0, **overrides: object) -> tuple[CLOCModel, CLOCModel]:
    """Two encoders with identical weights: ``prompter_pool="prompts"`` and ``"all"`` (random init, no download).

    The text tower is cut to one layer: it takes no part in region embeddings.
    """
    overrides = {"text_config": {"num_hidden_layers": 1}, **overrides}
    torch.manual_seed(seed)
    prompts_model = CLOCModel(preset_config(preset, prompter_pool="prompts", **overrides)).eval()
    all_model = CLOCModel(preset_config(preset, prompter_pool="all", **overrides)).eval()
    all_model.load_state_dict(prompts_model.state_dict())
    return prompts_model, all_model


def crop_and_resize(pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Crops of one image ``(3, S, S)`` at model-frame boxes ``(R, 4)``, each resized to ``(3, S, S)``."""
    side = pixels.shape[-1]
    return roi_align(pixels[None], [boxes * side], output_size=side, spatial_scale=1.0, sampling_ratio=2, aligned=True)


@torch.inference_mode()
def run_benchmark(
    preset: str = "vit-b-16",
    box_counts: Sequence[int] = DEFAULT_BOX_COUNTS,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    **overrides: object,
) -> list[BenchRow]:
    """Time the four paths for each box count, interleaved (fp32, on CPU, with torch's current thread count)."""
    prompts_model, all_model = build_models(preset, seed, **overrides)
    config = prompts_model.config
    side = config.vision_config.image_size
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(3, side, side, generator=generator)
    state = prompts_model.encode_images(pixels[None])
    rows = []
    for count in box_counts:
        boxes = random_boxes(count, generator)
        image_index = torch.zeros(count, dtype=torch.long)

        def prompts(boxes: torch.Tensor = boxes, image_index: torch.Tensor = image_index) -> torch.Tensor:
            state.key_values = None  # the image keys/values are part of the cost
            return prompts_model.region_embeddings(state, boxes, image_index)

        def all_tokens(boxes: torch.Tensor = boxes, image_index: torch.Tensor = image_index) -> torch.Tensor:
            return all_model.region_embeddings(state, boxes, image_index)

        def crop(boxes: torch.Tensor = boxes) -> torch.Tensor:
            return prompts_model.encode_images(crop_and_resize(pixels, boxes)).image_embeds

        times = median_ms(
            {
                "vit": lambda: prompts_model.encode_images(pixels[None]),
                "prompts": prompts,
                "all": all_tokens,
                "crop": crop,
            },
            repeats,
            warmup,
        )
        rows.append(
            BenchRow(
                boxes=count,
                layers=config.vision_config.num_hidden_layers,
                vit_ms=times["vit"],
                prompts_ms=times["prompts"],
                all_ms=times["all"],
                crop_ms=times["crop"],
            )
        )
    return rows


def format_table(rows: Sequence[BenchRow], title: str = "") -> str:
    """A Markdown table of the rows, then the targets and how each row meets them."""
    layers = rows[0].layers if rows else 12
    header = (
        "| boxes | ViT pass ms | prompter (prompts) ms | prompter (all) ms | crop + re-encode ms "
        f"| speed-up prompts | speed-up all | bound {layers}R/({layers}+R) | all / bound |"
    )
    lines = [title, ""] if title else []
    lines += [header, "|" + "---:|" * 9]
    for row in rows:
        lines.append(
            f"| {row.boxes} | {row.vit_ms:.1f} | {row.prompts_ms:.2f} | {row.all_ms:.1f} | {row.crop_ms:.1f} "
            f"| {row.speedup_prompts:.1f}x | {row.speedup_all:.2f}x | {row.bound_all:.2f}x "
            f"| {row.speedup_all / row.bound_all:.2f} |"
        )
    checks = []
    for row in rows:
        if row.boxes in TARGETS:
            met = "met" if row.speedup_prompts >= TARGETS[row.boxes] else "MISSED"
            checks.append(
                f"prompts path at {row.boxes} boxes: {row.speedup_prompts:.1f}x (target >= "
                f"{TARGETS[row.boxes]:g}x) {met}"
            )
    for row in rows:
        ratio = row.speedup_all / row.bound_all
        met = "met" if ratio >= 1.0 - BOUND_TOLERANCE else "MISSED"
        checks.append(
            f"all-token mode at {row.boxes} boxes: {ratio:.2f} of the bound (target >= {1 - BOUND_TOLERANCE:.2f}) {met}"
        )
    return "\n".join([*lines, "", *checks])


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.region_embed", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="vit-b-16", help="factory preset of the encoder (default vit-b-16)")
    parser.add_argument("--boxes", type=int, nargs="+", default=list(DEFAULT_BOX_COUNTS), help="box counts")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny preset, 1 and 4 boxes, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.boxes, args.repeats = "tiny", [1, 4], 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = run_benchmark(args.preset, args.boxes, args.repeats, args.warmup, args.seed)
    title = (
        f"preset {args.preset}, fp32, {torch.get_num_threads()} CPU threads ({platform.processor() or 'cpu'}), "
        f"torch {torch.__version__}, median of {args.repeats} after {args.warmup} warm-up"
    )
    print(format_table(rows, title))
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
