"""The GPU check's report: the environment (versions, device) and the markdown table of the parts."""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Mapping
from typing import Any

import torch

from bench.gpu_checks.base import PartResult


def environment() -> dict[str, Any]:
    """Versions and the device."""

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    packages = ("torch", "transformers", "accelerate", "peft", "deepspeed", "bitsandbytes", "flash-attn", "safetensors")
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "packages": {name: version(name) for name in packages},
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["device_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return info


def _summary(result: PartResult) -> str:
    """One line of the headline numbers of a part."""
    m = result.metrics
    if not m:
        return ""
    if result.key == "a":
        mfu = m["mfu"] if isinstance(m["mfu"], str) else f"{100 * m['mfu']:.1f}%"
        return (
            f"{m['parameters'] / 1e6:,.1f}M params ({m['text_layers']} LLM layers), batch {m['batch']} × "
            f"{m['tokens_per_sample']} tokens: {m['tokens_per_s']:.0f} tokens/s, {m['achieved_tflops']:.1f} TFLOPS, "
            f"MFU {mfu}; dtype checks {'pass' if m['dtype_checks']['all'] else 'FAIL ' + str(m['dtype_failures'])}"
        )
    if result.key == "b":
        parts = [f"{k.removesuffix('_max_abs_diff')}: max |Δlogit| {v:.3g}" for k, v in m.items() if "max_abs" in k]
        return "; ".join(parts) + f" (|logit| max {m['logits_abs_max']:.3g})"
    if result.key == "c":
        return (
            f"{m['linear4bit_modules']} Linear4bit, trainable {sum(m['trainable'].values()):,}, "
            f"step {m['step_s']:.2f} s, loss {m['loss']:.3f}"
        )
    if result.key == "d":
        return "; ".join(
            f"batch {b}: ours {m[f'ours_batch{b}_tokens_per_s']:.1f} vs {m[f'transformers_batch{b}_tokens_per_s']:.1f}"
            f" tokens/s (ratio {m[f'ratio_batch{b}_ours_vs_transformers']:.3f})"
            for b in (1, 8)
        )
    if result.key == "e":
        e, r = m["bf16_tower_embedding"], m["bf16_rounded_boxes_fp32_tower_embedding"]
        return (
            f"{m['boxes']} boxes ({m['thin_boxes']} thin): bf16 tower cos mean {e['cos_mean']:.4f} min "
            f"{e['cos_min']:.4f} (thin min {e['cos_min_thin']:.4f}); bf16-rounded boxes alone: min "
            f"{r['cos_min']:.4f} (thin min {r['cos_min_thin']:.4f})"
        )
    if result.key == "f":
        return (
            f"{m['numel_total']:,} parameters, {m['numel_per_rank']:,} on this rank "
            f"({m['partitioned']} of {m['parameters']} partitioned), build {m['build_s']:.1f} s"
        )
    return ""


def format_markdown(report: Mapping[str, Any]) -> str:
    """The markdown table of a report."""
    env = report["environment"]
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    lines = [
        f"# GPU check ({'CPU smoke' if report['smoke'] else env.get('device', 'no CUDA device')})",
        "",
        f"Python {env['python']}, CUDA {env['cuda']}; {packages}",
        "",
        "| part | check | status | seconds | result |",
        "| --- | --- | --- | ---: | --- |",
    ]
    for part in report["parts"]:
        text = part["note"] if part["status"] != "ok" else ""
        summary = _summary(PartResult(**part))
        text = f"{text}; {summary}" if text and summary and part["status"] == "skipped" else text or summary
        lines.append(f"| ({part['key']}) | {part['title']} | {part['status']} | {part['seconds']:.1f} | {text} |")
    wheels = report["wheels_to_complete"]
    lines += ["", "Wheels that would complete the skipped parts: " + ("; ".join(wheels) if wheels else "none"), ""]
    return "\n".join(lines)
