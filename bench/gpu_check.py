"""GPU check: one command (a few minutes on one H100) that exercises what only a GPU shows, writing a JSON file and a
markdown table to ``--out``.

Parts (each independent: a part whose packages are missing is *skipped* with the reason, a part that raises is
*failed* with its error — the traceback goes to ``gpu_check.log`` — and the other parts still run):

(a) a bf16 stage-2 training step of a ≥ 1B-parameter CLOC-LLaVA shaped like the 7B one (CLIP ViT-L/14-336 CLOC
    tower, Llama-7B widths) with ``--text-layers`` layers: tokens/s and MFU against the card's dense bf16 peak
    (:data:`BF16_PEAK_TFLOPS`; unknown card → ``n/a``), peak memory, and the dtype checks of ``bench.real_size``;
(b) logits with ``sdpa`` against ``flash_attention_2`` (and ``eager``) at identical weights: max abs difference;
(c) a QLoRA step: the model saved, reloaded 4-bit NF4 (``mllm.loading``), LoRA adapters (``train.mllm_trainable``),
    forward + backward + AdamW step;
(d) generation throughput at batch 1 and 8 against transformers' ``LlavaForConditionalGeneration`` at identical
    sizes (ratio of new tokens/s);
(e) region embeddings of the bf16 vision tower against the fp32 one on random boxes, thin ones included (cosine
    mean/min), and what rounding the box coordinates to bf16 alone would cost;
(f) ZeRO-3 initialisation on one GPU: the model built under ``HfDeepSpeedConfig`` (transformers wraps the
    construction in ``deepspeed.zero.Init``); parameters partitioned, numel per rank.

    python -m bench.gpu_check --out runs/gpu_check          # on a CUDA machine
    python -m bench.gpu_check --cpu-smoke --out /tmp/check  # the same code at tiny sizes on CPU (the test suite)

The output lists the wheels that would complete the skipped parts (for a machine without network).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bench.gpu_checks.attention import part_attention
from bench.gpu_checks.base import CheckContext, Part, PartResult, PartSkipped, Settings, missing_modules, wheel_for
from bench.gpu_checks.generation import part_generation
from bench.gpu_checks.qlora import part_qlora
from bench.gpu_checks.region_precision import part_region_precision, region_test_boxes
from bench.gpu_checks.report import environment, format_markdown
from bench.gpu_checks.train_step import device_peak_tflops, part_train_step, stage2_step_flops
from bench.gpu_checks.zero3_init import part_zero3_init
from bench.scale.inputs import build_processor
from bench.scale.shapes import build_tokenizer, cloc_llava_config

__all__ = [
    "PARTS",
    "CheckContext",
    "Part",
    "PartResult",
    "Settings",
    "device_peak_tflops",
    "format_markdown",
    "main",
    "region_test_boxes",
    "run_checks",
    "run_part",
    "stage2_step_flops",
    "wheel_for",
]
"""What this entry point offers: the runner (:data:`PARTS`, :func:`run_part`, :func:`run_checks`, :func:`main`) and
the names of :mod:`bench.gpu_checks` that its callers use with it."""

REPO = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("bench.gpu_check")


# ----- runner ------------------------------------------------------------------------------------------------------

PARTS = (
    Part("a", "bf16 stage-2 step: tokens/s, MFU", part_train_step),
    Part("b", "sdpa vs flash_attention_2 logits", part_attention),
    Part("c", "QLoRA 4-bit step (bitsandbytes + peft)", part_qlora, ("bitsandbytes", "peft")),
    Part("d", "generation vs LlavaForConditionalGeneration", part_generation),
    Part("e", "bf16 vs fp32 region embeddings", part_region_precision),
    Part("f", "ZeRO-3 init on one device", part_zero3_init, ("deepspeed",)),
)


def run_part(part: Part, ctx: CheckContext) -> PartResult:
    """Run one part; a missing package or device skips it, an error fails it (traceback logged), never raises."""
    result = PartResult(part.key, part.title, "ok")
    missing = missing_modules(part.requires)
    if missing:
        result.status, result.note = "skipped", f"skipped: {', '.join(missing)} not installed"
        result.wheels = [wheel_for(name) for name in missing]
        return result
    if ctx.device.type == "cuda" and not torch.cuda.is_available():
        result.status, result.note = "skipped", "skipped: no CUDA device visible"
        return result
    start = time.perf_counter()
    try:
        result.metrics = part.run(ctx)
    except PartSkipped as skipped:
        result.status, result.note, result.wheels, result.metrics = (
            "skipped",
            skipped.reason,
            skipped.wheels,
            skipped.metrics,
        )
    except Exception as error:  # noqa: BLE001 - one failing part must not stop the others; recorded with traceback
        LOG.error("part (%s) %s failed:\n%s", part.key, part.title, traceback.format_exc())
        result.status, result.note = "failed", f"{type(error).__name__}: {error}"
    finally:
        result.seconds = time.perf_counter() - start
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def run_checks(settings: Settings, out: Path, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the parts (``only``: their keys), write ``gpu_check.json``, ``gpu_check.md`` and ``gpu_check.log`` to
    ``out``; return the report."""
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "gpu_check.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    started = time.perf_counter()
    try:
        tokenizer = build_tokenizer()
        config = cloc_llava_config(settings.shape, settings.text_layers, tokenizer)
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
            ctx = CheckContext(settings, tokenizer, config, build_processor(config, tokenizer), Path(work))
            results = []
            for part in PARTS:
                if only and part.key not in only:
                    continue
                LOG.info("part (%s) %s: starting", part.key, part.title)
                result = run_part(part, ctx)
                LOG.info("part (%s): %s %s (%.1f s)", part.key, result.status, result.note, result.seconds)
                print(f"({part.key}) {part.title}: {result.status} {result.note}".rstrip(), flush=True)
                results.append(result)
        wheels = sorted({wheel for result in results for wheel in result.wheels})
        report = {
            "smoke": settings.smoke,
            "settings": asdict(settings) | {"shape": asdict(settings.shape)},
            "environment": environment(),
            "parts": [asdict(result) for result in results],
            "wheels_to_complete": wheels,
            "total_s": time.perf_counter() - started,
        }
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (out / "gpu_check.md").write_text(format_markdown(report))
        return report
    finally:
        LOG.removeHandler(handler)
        handler.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs/gpu_check")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (what the test suite runs)")
    parser.add_argument("--text-layers", type=int, default=4, help="LLM layers of the 7B-shaped model (4: ~1.4B)")
    parser.add_argument("--parts", default=None, help="comma-separated part keys to run (default: all)")
    args = parser.parse_args(argv)
    settings = Settings.cpu_smoke() if args.cpu_smoke else Settings.gpu(args.text_layers)
    only = [key.strip() for key in args.parts.split(",")] if args.parts else None
    report = run_checks(settings, args.out, only)
    print()
    print(format_markdown(report))
    print(f"wrote {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'} ({report['total_s']:.0f} s)")
    return 1 if any(part["status"] == "failed" for part in report["parts"]) else 0


if __name__ == "__main__":
    sys.exit(main())
