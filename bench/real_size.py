"""Real-size dry run on CPU: CLOC-LLaVA at LLaVA-1.5-7B shapes, with a 2-layer language model.

What the tiny world cannot show (DESIGN.md, "At real scale"): the model is built from configs with random weights
at real widths — a CLOC encoder with CLIP ViT-L/14-336 shapes (24 × 1024, patch 14, 336 px → 576 image tokens)
and a Llama-7B-shaped LLM (4096 wide, 32 heads, intermediate 11008, vocab 32000) cut to ``--text-layers`` layers —
in bf16 on CPU, and runs:

1. the full-depth model's parameter count, per part, from the ``meta`` device (no memory), next to transformers'
   ``LlavaForConditionalGeneration`` at identical sizes and LLaVA-1.5-7B's published sizes;
2. DeepSpeed's estimates of model-state memory for ZeRO-2 and ZeRO-3 on 1 and 8 × 80 GB GPUs (from parameter
   counts; no GPU needed);
3. one stage-2 training step (forward + backward + AdamW step; LLM and projectors trained, ViT frozen) on a prompt
   with an ``<image>`` and two ``<region>``s (one of them a thin box), with forward hooks recording the dtype of each
   module's input and output along the path (vision tower → projector; box → prompter point encoding → prompter →
   region projector; embeddings → decoder layers → LM head → loss);
4. 4 greedy tokens with ``generate``.

The dtype checks: every language-model activation is the model's dtype (bf16; no fp32 activations by accident),
the loss is reduced in fp32, and the box geometry (the prompter's point-encoder input, its output and its
frequency table) is fp32 — coordinates must not be rounded to bf16 (8 bits of mantissa: near x = 0.9 a bf16
coordinate moves in steps of 1/256, and a 64-cycle sinusoid of it loses its phase).

    python -m bench.real_size                     # ~1.1B parameters built, ~3 GB peak with optimizer state
    python -m bench.real_size --shape smoke       # the same code at tiny sizes (the test)

It prints markdown tables and writes ``real_size.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bench.scale.dtypes import DtypeRecord, DtypeTracer, dtype_checks, dtype_name, geometry_buffers, trace_points
from bench.scale.inputs import build_processor, stage2_batch
from bench.scale.parameters import (
    CLOC_PARTS,
    count_parameters,
    deepspeed_estimates,
    meta_parameter_counts,
    stage2_trainable,
)
from bench.scale.shapes import (
    LLAVA_1_5_7B_PUBLISHED,
    LLAVA_7B_SHAPE,
    SHAPES,
    SMOKE_SHAPE,
    ModelShape,
    build_model,
    build_tokenizer,
    cloc_llava_config,
)
from mllm import CLOCLlavaForConditionalGeneration

__all__ = [
    "CLOC_PARTS",
    "LLAVA_7B_SHAPE",
    "SMOKE_SHAPE",
    "DtypeTracer",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "cloc_llava_config",
    "dtype_checks",
    "format_report",
    "main",
    "meta_parameter_counts",
    "run",
    "stage2_batch",
    "trace_points",
]
"""What this entry point offers: :func:`run`, :func:`format_report` and :func:`main`, and the building blocks of
:mod:`bench.scale` that its callers use with them."""

REPO = Path(__file__).resolve().parents[1]


# ----- the dry run -------------------------------------------------------------------------------------------------


def peak_rss_gib() -> float:
    """This process's peak resident memory (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def training_step(
    model: CLOCLlavaForConditionalGeneration,
    batch: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    tracer: DtypeTracer | None = None,
) -> dict[str, float]:
    """Forward (dtypes recorded) + backward + optimizer step; seconds per phase and the loss."""
    start = time.perf_counter()
    if tracer is not None:
        with tracer.recording():
            output = model(**batch)
    else:
        output = model(**batch)
    loss = output.loss
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    done = time.perf_counter()
    return {
        "loss": float(loss.detach().float()),
        "loss_dtype": dtype_name(loss),
        "forward_s": forward - start,
        "backward_s": backward - forward,
        "optimizer_s": done - backward,
        "step_s": done - start,
    }


def run(
    shape: ModelShape = LLAVA_7B_SHAPE,
    text_layers: int = 2,
    new_tokens: int = 4,
    dtype: torch.dtype = torch.bfloat16,
    gpu_counts: Sequence[int] = (1, 8),
) -> dict[str, Any]:
    """The whole dry run; returns everything :func:`main` prints and writes."""
    tokenizer = build_tokenizer()
    full_config = cloc_llava_config(shape, shape.text_full_layers, tokenizer)
    counts = meta_parameter_counts(full_config)
    ours = counts["cloc_llava"]
    try:
        estimates: list[dict[str, Any]] | str = deepspeed_estimates(ours["total"], ours["largest_module"], gpu_counts)
    except ImportError as error:
        estimates = f"skipped: deepspeed not installed ({error})"

    config = cloc_llava_config(shape, text_layers, tokenizer)
    start = time.perf_counter()
    model = build_model(config, dtype)
    build_s = time.perf_counter() - start
    built = count_parameters(model, CLOC_PARTS)
    trainable = stage2_trainable(model)
    model.train()
    tracer = DtypeTracer(model, trace_points(model))
    processor = build_processor(config, tokenizer)
    batch, prompt = stage2_batch(processor)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, foreach=False)
    step = training_step(model, batch, optimizer, tracer)
    tracer.close()
    del optimizer
    records = tracer.records(dtype) + geometry_buffers(model)
    loss_ok = step["loss_dtype"] == "float32"
    records.append(DtypeRecord("loss", "loss", "loss", None, step["loss_dtype"], "· → float32", loss_ok))

    model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        generated = model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    generate_s = time.perf_counter() - start
    new_ids = generated[0, prompt["input_ids"].shape[1] :].tolist()
    return {
        "shape": asdict(shape) | {"cloc_overrides": dict(shape.cloc_overrides)},
        "dtype": dtype_name(torch.empty(0, dtype=dtype)),
        "threads": torch.get_num_threads(),
        "full_depth_parameters": counts,
        "published_llava_1_5_7b": LLAVA_1_5_7B_PUBLISHED if shape is LLAVA_7B_SHAPE else None,
        "built": {"text_layers": text_layers, "parameters": built, "stage2_trainable": trainable},
        "sequence": {
            "tokens": int(batch["input_ids"].shape[1]),
            "image_tokens": int(config.image_seq_length),
            "regions": int(batch["region_boxes"].shape[0]),
            "supervised_tokens": int((batch["labels"] != -100).sum()),
        },
        "deepspeed_estimates": estimates,
        "dtypes": [asdict(record) for record in records],
        "checks": dtype_checks(records),
        "timings": {
            "build_s": build_s,
            **{k: v for k, v in step.items() if k.endswith("_s")},
            "generate_s": generate_s,
            "new_tokens": len(new_ids),
            "peak_rss_gib": peak_rss_gib(),
        },
        "loss": step["loss"],
        "generated_ids": new_ids,
    }


# ----- report ------------------------------------------------------------------------------------------------------


def _b(count: float) -> str:
    return f"{count / 1e9:.4f}B" if count >= 1e8 else f"{count / 1e6:.2f}M"


def format_report(result: Mapping[str, Any]) -> str:
    """Markdown tables of a :func:`run` result."""
    ours, llava = result["full_depth_parameters"]["cloc_llava"], result["full_depth_parameters"]["llava_hf"]
    shape = result["shape"]
    published = result["published_llava_1_5_7b"] or {}
    lines = [
        f"## Parameters at full depth ({shape['text_full_layers']} LLM layers; meta device)",
        "",
        "| part | CLOC-LLaVA | transformers LLaVA, same sizes | LLaVA-1.5-7B as published |",
        "| --- | ---: | ---: | ---: |",
    ]
    for part in ("ViT", "prompter", "image projector", "region projector", "LLM body", "LM head", "LLM", "total"):
        reference = published.get(part)
        lines.append(
            f"| {part} | {_b(ours[part])} ({ours[part]:,}) | "
            f"{_b(llava[part]) if part in llava else '—'} | {f'~{reference / 1e9:.2f}B' if reference else '—'} |"
        )
    extra = ours["total"] - llava["total"]
    lines += [
        "",
        f"CLOC-LLaVA − LLaVA = {extra:,} parameters (prompter + region projector = "
        f"{ours['prompter'] + ours['region projector']:,}); largest single module {ours['largest_module']:,}.",
        "",
    ]
    estimates = result["deepspeed_estimates"]
    lines.append("## DeepSpeed model-state memory estimates (all parameters trained; no activations)")
    lines.append("")
    if isinstance(estimates, str):
        lines.append(estimates)
    else:
        lines += [
            "| ZeRO | GPUs | options | per GPU GiB | CPU per node GiB | fits 80 GB |",
            "| --- | ---: | --- | ---: | ---: | --- |",
        ]
        for row in estimates:
            lines.append(
                f"| {row['zero_stage']} | {row['gpus']} | {row['options']} | {row['per_gpu_gib']:.1f} | "
                f"{row['per_node_cpu_gib']:.1f} | {'yes' if row['fits'] else 'no'} |"
            )
    built, sequence, timings = result["built"], result["sequence"], result["timings"]
    lines += [
        "",
        f"## Dtypes along the path ({result['dtype']} model, {built['text_layers']} LLM layers, "
        f"{sequence['tokens']} tokens: {sequence['image_tokens']} image, {sequence['regions']} regions)",
        "",
        "| where | module | input | output | expected | ok |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["dtypes"]:
        ok = {True: "yes", False: "**NO**", None: ""}[row["ok"]]
        lines.append(
            f"| {row['label']} | `{row['module']}` | {row['input_dtype'] or '—'} | {row['output_dtype'] or '—'} | "
            f"{row['expected']} | {ok} |"
        )
    lines += ["", "checks: " + ", ".join(f"{k}={'pass' if v else 'FAIL'}" for k, v in result["checks"].items()), ""]
    lines += [
        f"## Timings (CPU, {result['threads']} threads; {_b(built['parameters']['total'])} parameters built, "
        f"{_b(sum(built['stage2_trainable'].values()))} trained)",
        "",
        "| build | forward | backward | AdamW step | generate |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| {timings['build_s']:.1f} s | {timings['forward_s']:.1f} s | {timings['backward_s']:.1f} s | "
        f"{timings['optimizer_s']:.1f} s | {timings['generate_s']:.1f} s ({timings['new_tokens']} tokens) |",
        "",
        f"loss {result['loss']:.3f}; generated ids {result['generated_ids']}; "
        f"peak RSS {timings['peak_rss_gib']:.2f} GiB",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=LLAVA_7B_SHAPE.name)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=REPO / "runs/bench_real_size")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a dtype check fails")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(SHAPES[args.shape], args.text_layers, args.new_tokens)
    print(format_report(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_size.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out / 'real_size.json'}")
    return 1 if args.strict and not result["checks"]["all"] else 0


if __name__ == "__main__":
    sys.exit(main())
