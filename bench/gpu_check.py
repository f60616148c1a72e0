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
import contextlib
import copy
import gc
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from bench.real_size import (
    CLOC_PARTS,
    LLAVA_7B_SHAPE,
    SMOKE_SHAPE,
    DtypeTracer,
    ModelShape,
    build_model,
    build_processor,
    build_tokenizer,
    cloc_llava_config,
    count_parameters,
    dtype_checks,
    geometry_buffers,
    llava_hf_config,
    stage2_batch,
    stage2_trainable,
    trace_points,
)
from cloc_encoder.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("bench.gpu_check")

BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)
"""Dense bf16 tensor-core peaks (TFLOPS, no sparsity) by a substring of ``torch.cuda.get_device_name``; the first
match wins, so the specific names come first."""

TESTED_WHEELS = {
    "deepspeed": "deepspeed==0.19.8",
    "bitsandbytes": "bitsandbytes==0.50.2",
    "peft": "peft==0.21.2",
    "accelerate": "accelerate==1.15.0",
}
"""Versions measured together with this project (docs/installation.md, requirements.txt)."""

MIN_GPU_PARAMETERS = 1_000_000_000


# ----- settings, context and results -------------------------------------------------------------------------------


@dataclass
class Settings:
    """Sizes and repetitions of a run: :meth:`gpu` (the real check) or :meth:`cpu_smoke` (tiny, on CPU)."""

    shape: ModelShape
    text_layers: int
    device: str
    train_batch: int
    train_steps: int
    new_tokens: int
    generate_rounds: int
    generate_prompt_tokens: int
    region_boxes: int
    smoke: bool

    @classmethod
    def gpu(cls, text_layers: int = 4) -> Settings:
        return cls(LLAVA_7B_SHAPE, text_layers, "cuda", 8, 5, 32, 3, 64, 512, smoke=False)

    @classmethod
    def cpu_smoke(cls) -> Settings:
        return cls(SMOKE_SHAPE, 2, "cpu", 2, 1, 4, 1, 8, 64, smoke=True)


@dataclass
class CheckContext:
    """What every part shares: settings, the tokenizer, the model config and the processor."""

    settings: Settings
    tokenizer: Any
    config: Any
    processor: Any
    work_dir: Path

    @property
    def device(self) -> torch.device:
        return torch.device(self.settings.device)


@dataclass
class PartResult:
    """One part's outcome. ``status``: ``ok``, ``skipped`` or ``failed``; ``note``: the reason or the error."""

    key: str
    title: str
    status: str
    note: str = ""
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    wheels: list[str] = field(default_factory=list)


class PartSkipped(Exception):
    """Raised inside a part that cannot run here (a missing package or device); not a failure."""

    def __init__(self, reason: str, wheels: Sequence[str] = (), metrics: Mapping[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wheels = list(wheels)
        self.metrics = dict(metrics or {})


@dataclass
class Part:
    """A check: ``run(ctx)`` returns its metrics; ``requires`` are importable module names."""

    key: str
    title: str
    run: Callable[[CheckContext], dict[str, Any]]
    requires: tuple[str, ...] = ()
    needs_cuda: bool = False


def wheel_for(module: str) -> str:
    """What to install for an importable module name (a pinned wheel, or how to get one)."""
    if module == "flash_attn":
        return flash_attn_wheel_hint()
    return TESTED_WHEELS.get(module, module)


def flash_attn_wheel_hint() -> str:
    """flash-attn has no PyPI wheel: a prebuilt one must match Python, torch, CUDA and the C++ ABI."""
    python = f"cp{sys.version_info.major}{sys.version_info.minor}"
    torch_version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    cuda = torch.version.cuda or "?"
    abi = "TRUE" if torch.compiled_with_cxx11_abi() else "FALSE"
    return (
        f"flash-attn: a prebuilt wheel for {python}, torch {torch_version}, CUDA {cuda}, cxx11abi{abi} "
        f"(flash_attn-<version>+cu{cuda.split('.')[0]}torch{torch_version}cxx11abi{abi}-{python}-{python}-"
        "linux_x86_64.whl), or build it from source"
    )


def missing_modules(names: Sequence[str]) -> list[str]:
    """The names among ``names`` that cannot be imported."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----- (a) bf16 stage-2 step ---------------------------------------------------------------------------------------


def device_peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of a device by name (:data:`BF16_PEAK_TFLOPS`), ``None`` when unknown."""
    for key, tflops in BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def stage2_step_flops(config: Any, counts: Mapping[str, int], batch: int, tokens: int, images: int) -> float:
    """Model FLOPs of one stage-2 step (PaLM's convention; no recomputation counted).

    LLM (trained): ``6·N·T + 12·L·d·s·T`` with ``N`` the matmul parameters (body without the embedding table, plus
    the LM head), ``T = batch·tokens`` and ``s = tokens``. ViT (frozen: forward only): ``2·N_vit·P + 4·L_v·d_v·P²``
    per image of ``P`` tokens. Projectors (trained): ``6·N_proj`` per image token; prompter and region projector
    are negligible and not counted.
    """
    text, vision = config.text_config, config.vision_config.vision_config
    dense = counts["LLM"] - text.vocab_size * text.hidden_size
    total_tokens = batch * tokens
    llm = 6 * dense * total_tokens + 12 * text.num_hidden_layers * text.hidden_size * tokens * total_tokens
    patches = config.vision_config.num_patches + int(config.vision_config.has_cls_token)
    vit = images * (2 * counts["ViT"] * patches + 4 * vision.num_hidden_layers * vision.hidden_size * patches**2)
    projector = 6 * counts["image projector"] * images * config.image_seq_length
    return float(llm + vit + projector)


def part_train_step(ctx: CheckContext) -> dict[str, Any]:
    """(a) bf16 stage-2 steps at the 7B widths: tokens/s, MFU, memory, dtypes."""
    settings, device = ctx.settings, ctx.device
    _reset_peak(device)
    model = build_model(ctx.config, torch.bfloat16, device)
    counts = count_parameters(model, CLOC_PARTS)
    if not settings.smoke and counts["total"] < MIN_GPU_PARAMETERS:
        raise ValueError(f"the model has {counts['total']:,} parameters; the check wants >= 1B (more --text-layers)")
    trainable = stage2_trainable(model)
    model.train()
    batch, _ = stage2_batch(ctx.processor, settings.train_batch)
    batch = _to(batch, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    tracer = DtypeTracer(model, trace_points(model))

    def step(record: bool) -> float:
        _sync(device)
        start = time.perf_counter()
        with tracer.recording() if record else contextlib.nullcontext():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"loss is {loss.item()}")
        step.loss = float(loss.detach().float())  # type: ignore[attr-defined]
        return time.perf_counter() - start

    step(record=True)  # warm-up (kernels, allocator) with the dtype hooks on
    tracer.close()
    times = [step(record=False) for _ in range(settings.train_steps)]
    seconds = statistics.median(times)
    tokens = int(batch["input_ids"].shape[1])
    flops = stage2_step_flops(ctx.config, counts, settings.train_batch, tokens, settings.train_batch)
    name = device_name(device)
    peak = device_peak_tflops(name) if device.type == "cuda" else None
    records = tracer.records(torch.bfloat16) + geometry_buffers(model)
    checks = dtype_checks(records)
    failed = [f"{r.label}: {r.input_dtype} → {r.output_dtype}" for r in records if r.ok is False]
    return {
        "parameters": counts["total"],
        "trainable": sum(trainable.values()),
        "text_layers": ctx.config.text_config.num_hidden_layers,
        "batch": settings.train_batch,
        "tokens_per_sample": tokens,
        "step_s": seconds,
        "tokens_per_s": settings.train_batch * tokens / seconds,
        "model_tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / seconds / 1e12,
        "peak_bf16_tflops": peak,
        "mfu": flops / seconds / (peak * 1e12) if peak else "n/a",
        "peak_memory_gib": _peak_gib(device),
        "loss": step.loss,  # type: ignore[attr-defined]
        "dtype_checks": checks,
        "dtype_failures": failed,
    }


# ----- (b) sdpa vs flash_attention_2 -------------------------------------------------------------------------------


def _logits(model: torch.nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).logits.float()


def part_attention(ctx: CheckContext) -> dict[str, Any]:
    """(b) logits with sdpa vs eager, and vs flash_attention_2 when flash_attn imports on a GPU."""
    device = ctx.device
    model = build_model(ctx.config, torch.bfloat16, device).eval()
    _, prompt = stage2_batch(ctx.processor, 2)
    inputs = {k: v for k, v in _to(prompt, device).items() if k != "labels"}
    reference = _logits(model, inputs)
    metrics: dict[str, Any] = {"logits_abs_max": float(reference.abs().max()), "tokens": int(reference.shape[1])}
    implementations = ["eager"]
    has_flash = not missing_modules(["flash_attn"]) and device.type == "cuda"
    if has_flash:
        implementations.append("flash_attention_2")
    for implementation in implementations:
        model.set_attn_implementation(implementation)
        other = _logits(model, inputs)
        metrics[f"{implementation}_max_abs_diff"] = float((other - reference).abs().max())
        metrics[f"{implementation}_argmax_agreement"] = float((other.argmax(-1) == reference.argmax(-1)).float().mean())
    model.set_attn_implementation("sdpa")
    if not has_flash:
        reason = "flash_attn not installed" if missing_modules(["flash_attn"]) else "flash_attention_2 needs a GPU"
        raise PartSkipped(
            f"skipped: {reason} (sdpa vs eager: max abs diff {metrics['eager_max_abs_diff']:.3g})",
            [wheel_for("flash_attn")] if missing_modules(["flash_attn"]) else [],
            metrics,
        )
    return metrics


# ----- (c) QLoRA step ----------------------------------------------------------------------------------------------


def part_qlora(ctx: CheckContext) -> dict[str, Any]:
    """(c) save → load 4-bit NF4 (``mllm.loading``) → LoRA (``train.mllm_trainable``) → one training step."""
    from mllm.loading import load_pretrained_model
    from train.mllm.config import MLLMTrainConfig
    from train.mllm.trainable import apply_lora, build_optimizer, configure_trainable, parameter_groups

    device, smoke = ctx.device, ctx.settings.smoke
    folder = ctx.work_dir / "qlora_base"
    model = build_model(ctx.config, torch.bfloat16, device)
    model.save_pretrained(folder)
    del model
    gc.collect()
    _reset_peak(device)
    start = time.perf_counter()
    quantized = load_pretrained_model(
        folder, bits=4, dtype=torch.bfloat16, device_map={"": str(device) if device.type == "cpu" else 0},
        allow_cpu_quantization=smoke,
    )  # fmt: skip
    load_s = time.perf_counter() - start
    import bitsandbytes as bnb

    four_bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in quantized.modules())
    train_config = MLLMTrainConfig(stage=2, lora=True, bits=4, lora_r=16, lora_alpha=32, device=str(device))
    peft_model = apply_lora(quantized, train_config)
    counts = configure_trainable(peft_model, train_config)
    groups, _ = parameter_groups(peft_model, train_config)
    optimizer = build_optimizer(groups, train_config)
    batch, _ = stage2_batch(ctx.processor, ctx.settings.train_batch)
    batch = _to(batch, device)
    peft_model.train()
    times = []
    for _ in range(2):
        _sync(device)
        start = time.perf_counter()
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"QLoRA loss is {loss.item()}")
    return {
        "linear4bit_modules": four_bit,
        "trainable": counts,
        "load_4bit_s": load_s,
        "step_s": times[-1],
        "loss": float(loss.detach().float()),
        "peak_memory_gib": _peak_gib(device),
    }


# ----- (d) generation vs transformers' LLaVA -----------------------------------------------------------------------


def part_generation(ctx: CheckContext) -> dict[str, Any]:
    """(d) new tokens/s at batch 1 and 8, CLOC-LLaVA vs ``LlavaForConditionalGeneration`` at identical sizes."""
    from transformers import LlavaForConditionalGeneration

    from bench.generate import make_inputs

    settings, device = ctx.settings, ctx.device
    ours = build_model(ctx.config, torch.bfloat16, device).eval()
    llava_config = llava_hf_config(ctx.config)
    torch.manual_seed(0)
    with torch.device(device):
        reference = LlavaForConditionalGeneration._from_config(llava_config, dtype=torch.bfloat16).eval()
    options = {"max_new_tokens": settings.new_tokens, "min_new_tokens": settings.new_tokens, "do_sample": False}
    metrics: dict[str, Any] = {"new_tokens": settings.new_tokens, "rounds": settings.generate_rounds}
    for batch_size in (1, 8):
        inputs = _to(make_inputs(llava_config, batch_size, settings.generate_prompt_tokens, seed=batch_size), device)
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        times: dict[str, list[float]] = {"ours": [], "transformers": []}
        for round_index in range(settings.generate_rounds + 1):  # the first round warms up
            for name, model in (("transformers", reference), ("ours", ours)):
                _sync(device)
                start = time.perf_counter()
                with torch.inference_mode():
                    model.generate(**inputs, **options)
                _sync(device)
                if round_index:
                    times[name].append(time.perf_counter() - start)
        for name, values in times.items():
            metrics[f"{name}_batch{batch_size}_tokens_per_s"] = (
                batch_size * settings.new_tokens / statistics.median(values)
            )
        metrics[f"ratio_batch{batch_size}_ours_vs_transformers"] = (
            metrics[f"ours_batch{batch_size}_tokens_per_s"] / metrics[f"transformers_batch{batch_size}_tokens_per_s"]
        )
    return metrics


# ----- (e) bf16 vs fp32 region embeddings --------------------------------------------------------------------------


def region_test_boxes(count: int, pixels: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(count, 4)`` model-frame boxes and a ``(count,)`` thin-box mask: half ordinary boxes (sides 0.05–1), half
    thin ones (one side 0.5–2 pixels of a ``pixels``-px input), anywhere in the image (including near 1)."""
    half = count // 2
    size = 0.05 + 0.95 * torch.rand(half, 2, generator=generator)
    corner = (1.0 - size) * torch.rand(half, 2, generator=generator)
    ordinary = torch.cat([corner, corner + size], dim=1)
    thin_count = count - half
    thin_side = (0.5 + 1.5 * torch.rand(thin_count, generator=generator)) / pixels
    long_side = 0.1 + 0.8 * torch.rand(thin_count, generator=generator)
    sides = torch.stack([thin_side, long_side], dim=1)
    vertical = torch.rand(thin_count, generator=generator) < 0.5
    sides = torch.where(vertical[:, None], sides, sides.flip(1))
    corner = (1.0 - sides) * torch.rand(thin_count, 2, generator=generator)
    thin = torch.cat([corner, corner + sides], dim=1)
    mask = torch.cat([torch.zeros(half, dtype=torch.bool), torch.ones(thin_count, dtype=torch.bool)])
    return torch.cat([ordinary, thin]), mask


def _cosines(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    cosine = F.cosine_similarity(a.float(), b.float(), dim=-1).cpu()
    return {
        "cos_mean": float(cosine.mean()),
        "cos_min": float(cosine.min()),
        "cos_mean_thin": float(cosine[mask].mean()),
        "cos_min_thin": float(cosine[mask].min()),
    }


def part_region_precision(ctx: CheckContext) -> dict[str, Any]:
    """(e) region embeddings: bf16 tower vs fp32 tower (same weights), and fp32 tower with bf16-rounded boxes."""
    from mllm.vision_tower import CLOCVisionTower

    device, settings = ctx.device, ctx.settings
    torch.manual_seed(0)
    with torch.device(device):
        tower32 = CLOCVisionTower._from_config(ctx.config.vision_config, dtype=torch.float32).eval()
    tower16 = copy.deepcopy(tower32).to(torch.bfloat16)
    size = ctx.config.vision_config.vision_config.image_size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, size, size, generator=generator).to(device)
    boxes, thin = region_test_boxes(settings.region_boxes, size, generator)
    index = (torch.arange(len(boxes)) % 2).to(device)
    boxes = boxes.to(device)
    with torch.inference_mode():
        state32 = tower32.encode_images(pixels)
        pooled32, embed32 = tower32.region_features(state32, boxes, index)
        state16 = tower16.encode_images(pixels.to(torch.bfloat16))
        pooled16, embed16 = tower16.region_features(state16, boxes, index)
        rounded = boxes.to(torch.bfloat16).float()
        state32.key_values = None
        _, embed_r = tower32.region_features(state32, rounded, index)
    return {
        "boxes": len(boxes),
        "thin_boxes": int(thin.sum()),
        "bf16_tower_embedding": _cosines(embed16, embed32, thin),
        "bf16_tower_pooled": _cosines(pooled16, pooled32, thin),
        "bf16_rounded_boxes_fp32_tower_embedding": _cosines(embed_r, embed32, thin),
        "bf16_embedding_dtype": str(embed16.dtype).removeprefix("torch."),
    }


# ----- (f) ZeRO-3 init ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def single_process_group(device: torch.device) -> Iterator[None]:
    """A one-process ``torch.distributed`` group for DeepSpeed (NCCL on a GPU, gloo on CPU), torn down after."""
    import deepspeed
    import torch.distributed as dist

    variables = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip
    saved = {key: os.environ.get(key) for key in variables}
    created = not dist.is_initialized()
    os.environ.update({k: v for k, v in variables.items() if created or k not in os.environ})
    try:
        if created:
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
        yield
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def part_zero3_init(ctx: CheckContext) -> dict[str, Any]:
    """(f) build the model under ZeRO-3 the way the trainer does (:func:`train.mllm_zero3.sharded_build`:
    ``HfDeepSpeedConfig`` → transformers' ``deepspeed.zero.Init``)."""
    from mllm import CLOCLlavaForConditionalGeneration
    from train.mllm.zero3 import gathered, partition_report, sharded_build

    device = ctx.device
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3},
    }
    _reset_peak(device)
    with single_process_group(device), sharded_build(ds_config):
        if device.type == "cuda":
            torch.cuda.set_device(device)
        start = time.perf_counter()
        model = CLOCLlavaForConditionalGeneration._from_config(ctx.config, dtype=torch.bfloat16)
        build_s = time.perf_counter() - start
        report = partition_report(model)
        with gathered([model.lm_head.weight], modifier_rank=None), torch.no_grad():
            head = model.lm_head.weight
            head_shape, head_finite = tuple(head.shape), bool(torch.isfinite(head).all())
            head_std = float(head.float().std())
    if report["partitioned"] != report["parameters"]:
        raise AssertionError(f"{report['parameters'] - report['partitioned']} parameters were not partitioned")
    return {
        "world_size": 1,
        "build_s": build_s,
        "numel_total": report["full"],
        "numel_per_rank": report["local"],
        "partitioned": report["partitioned"],
        "parameters": report["parameters"],
        "lm_head_gathered_shape": list(head_shape),
        "lm_head_finite": head_finite,
        "lm_head_std": head_std,
        "peak_memory_gib": _peak_gib(device),
    }


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
