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
import re
import resource
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerBase

from cloc_encoder.factory import preset_config
from mllm import CLOCLlavaConfig, CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
from mllm.tiny import TINY_CORPUS
from mllm.tokenization import IMAGE_TOKEN, REGION_TOKEN, train_chat_tokenizer

REPO = Path(__file__).resolve().parents[1]


# ----- shapes and configs --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a CLOC-LLaVA: a CLOC encoder preset (:data:`cloc_encoder.factory.PRESETS`) and a Llama-shaped LLM.

    ``text_full_layers`` is the real depth (used for the parameter count); runs build fewer layers.
    """

    name: str
    cloc_preset: str
    text_hidden_size: int
    text_num_heads: int
    text_intermediate_size: int
    text_vocab_size: int
    text_full_layers: int
    text_max_positions: int = 4096
    cloc_overrides: Mapping[str, Any] = field(default_factory=dict)


LLAVA_7B_SHAPE = ModelShape(
    name="llava-1.5-7b",
    cloc_preset="vit-l-14-336",
    text_hidden_size=4096,
    text_num_heads=32,
    text_intermediate_size=11008,
    text_vocab_size=32000,
    text_full_layers=32,
)
"""CLIP ViT-L/14-336 CLOC encoder + Vicuna/Llama-7B shapes (LLaVA-1.5-7B)."""

SMOKE_SHAPE = ModelShape(
    name="smoke",
    cloc_preset="tiny",
    text_hidden_size=128,
    text_num_heads=4,
    text_intermediate_size=256,
    text_vocab_size=1024,
    text_full_layers=4,
    text_max_positions=512,
)
"""The same layout at tiny sizes (64-px images, 8-px patches → 64 image tokens): tests and ``--cpu-smoke``."""

SHAPES = {shape.name: shape for shape in (LLAVA_7B_SHAPE, SMOKE_SHAPE)}

LLAVA_1_5_7B_PUBLISHED = {"LLM": 6.74e9, "ViT": 0.30e9, "image projector": 0.02e9}
"""LLaVA-1.5-7B's part sizes as usually quoted (Vicuna-7B, CLIP ViT-L/14-336, mlp2x_gelu projector)."""


def build_tokenizer() -> PreTrainedTokenizerBase:
    """The offline byte-level BPE of :mod:`mllm.tiny` (it knows ``<image>`` and ``<region>``); its ids index the
    first rows of the larger vocabulary, which is fine for random weights."""
    return train_chat_tokenizer(TINY_CORPUS)


def cloc_llava_config(
    shape: ModelShape, text_layers: int, tokenizer: PreTrainedTokenizerBase, **overrides: Any
) -> CLOCLlavaConfig:
    """A :class:`CLOCLlavaConfig` of ``shape`` with ``text_layers`` LLM layers; special ids from ``tokenizer``.

    ``overrides`` set MLLM config fields (e.g. ``vision_feature_layer``).
    """
    if len(tokenizer) > shape.text_vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the vocabulary {shape.text_vocab_size}")
    text = {
        "model_type": "llama",
        "hidden_size": shape.text_hidden_size,
        "intermediate_size": shape.text_intermediate_size,
        "num_hidden_layers": text_layers,
        "num_attention_heads": shape.text_num_heads,
        "num_key_value_heads": shape.text_num_heads,
        "max_position_embeddings": shape.text_max_positions,
        "vocab_size": shape.text_vocab_size,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    return CLOCLlavaConfig(
        vision_config=preset_config(shape.cloc_preset, **dict(shape.cloc_overrides)),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        region_token_id=tokenizer.convert_tokens_to_ids(REGION_TOKEN),
        **overrides,
    )


def llava_hf_config(config: CLOCLlavaConfig) -> LlavaConfig:
    """transformers' :class:`LlavaConfig` at the sizes of ``config``: the same CLIP ViT, an mlp2x_gelu projector and
    the same language model (no prompter, no region projector)."""
    return LlavaConfig(
        vision_config=config.vision_config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        image_seq_length=config.image_seq_length,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=config.multimodal_projector_bias,
        tie_word_embeddings=False,
    )


def build_model(config: CLOCLlavaConfig, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0):
    """A randomly initialised :class:`CLOCLlavaForConditionalGeneration` built directly in ``dtype`` on ``device``
    (as ``from_pretrained(dtype=...)`` builds it: non-persistent buffers are created under that default dtype)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return CLOCLlavaForConditionalGeneration._from_config(config, dtype=dtype)


# ----- parameter counts --------------------------------------------------------------------------------------------

CLOC_PARTS = {
    "ViT": "model.vision_tower.vision_model",
    "prompter": "model.vision_tower.prompter",
    "image projector": "model.multi_modal_projector",
    "region projector": "model.region_projector",
    "LLM body": "model.language_model",
    "LM head": "lm_head",
}
LLAVA_PARTS = {
    "ViT": "model.vision_tower",
    "image projector": "model.multi_modal_projector",
    "LLM body": "model.language_model",
    "LM head": "lm_head",
}


def count_parameters(model: nn.Module, parts: Mapping[str, str]) -> dict[str, int]:
    """Parameters per part (by module-name prefix; shared tensors counted once), plus ``LLM`` (body + head),
    ``total``, ``other`` (anything outside the parts) and ``largest_module`` (most direct parameters of one
    module: what ZeRO-3 gathers at once)."""
    counts = dict.fromkeys(parts, 0)
    seen: set[int] = set()
    total = 0
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        for part, prefix in parts.items():
            if name.startswith(prefix + "."):
                counts[part] += parameter.numel()
                break
    counts["LLM"] = counts["LLM body"] + counts["LM head"]
    counts["total"] = total
    counts["other"] = total - sum(counts[part] for part in parts)
    counts["largest_module"] = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return counts


def meta_parameter_counts(config: CLOCLlavaConfig) -> dict[str, dict[str, int]]:
    """Parameter counts of CLOC-LLaVA and of transformers' LLaVA at ``config``'s sizes, built on the meta device."""
    with torch.device("meta"):
        ours = CLOCLlavaForConditionalGeneration(config)
        reference = LlavaForConditionalGeneration(llava_hf_config(config))
    return {"cloc_llava": count_parameters(ours, CLOC_PARTS), "llava_hf": count_parameters(reference, LLAVA_PARTS)}


def stage2_trainable(model: CLOCLlavaForConditionalGeneration) -> dict[str, int]:
    """Set stage-2 ``requires_grad`` with the trainer's own rules (``train.mllm_trainable``): LLM + both
    projectors, ViT and prompter frozen. Returns the trainable counts per group."""
    from train.mllm.config import MLLMTrainConfig
    from train.mllm.trainable import configure_trainable

    return configure_trainable(model, MLLMTrainConfig(stage=2))


# ----- DeepSpeed memory estimates ----------------------------------------------------------------------------------


def deepspeed_estimates(
    total_params: int, largest_module_params: int, gpus: Sequence[int] = (1, 8), gpu_memory_gb: float = 80.0
) -> list[dict[str, Any]]:
    """DeepSpeed's model-state memory estimates (parameters, gradients, optimizer states; no activations) for ZeRO-2
    and ZeRO-3 on one node of ``gpus`` GPUs, from parameter counts (DeepSpeed's ``estimate_zero*_model_states_mem_
    needs``, the functions behind its ``..._all_cold`` printers; ``additional_buffer_factor`` 1.5, ``zero_init``).

    DeepSpeed counts every parameter as trained (2 + 16 bytes each); stage 2 freezes the ViT, so these are upper
    bounds there. ``fits`` compares the per-GPU number with ``gpu_memory_gb`` (decimal GB, as cards are sold).
    Raises ``ImportError`` without deepspeed.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = []
    for count in gpus:
        for offload in ("none", "cpu"):
            cpu, gpu = estimate_zero2_model_states_mem_needs(
                total_params, num_gpus_per_node=count, cpu_offload=offload == "cpu"
            )
            rows.append(_estimate_row(2, count, f"offload_optimizer={offload}", gpu, cpu, gpu_memory_gb))
        for optimizer, params in (("none", "none"), ("cpu", "none"), ("cpu", "cpu")):
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                total_params,
                largest_module_params,
                num_gpus_per_node=count,
                cpu_offload=optimizer == "cpu",
                cpu_offload_params=params == "cpu",
                zero_init=True,
            )
            options = f"offload_optimizer={optimizer}, offload_param={params}"
            rows.append(_estimate_row(3, count, options, gpu, cpu, gpu_memory_gb))
    return rows


def _estimate_row(stage: int, gpus: int, options: str, gpu: int, cpu: int, limit_gb: float) -> dict[str, Any]:
    return {
        "zero_stage": stage,
        "gpus": gpus,
        "options": options,
        "per_gpu_gib": gpu / 2**30,
        "per_node_cpu_gib": cpu / 2**30,
        "fits": gpu < limit_gb * 1e9,
    }


# ----- dtype tracing -----------------------------------------------------------------------------------------------


@dataclass
class TracePoint:
    """A module whose input/output dtypes are recorded. ``expect_input`` / ``expect_output``: ``"model"`` (the
    model's dtype), ``"float32"``, or ``None`` (reported, not checked)."""

    label: str
    module: str
    part: str
    expect_input: str | None = None
    expect_output: str | None = None


@dataclass
class DtypeRecord:
    """One module call's dtypes and whether they matched the expectations (``None``: nothing was expected)."""

    label: str
    module: str
    part: str
    input_dtype: str | None
    output_dtype: str | None
    expected: str
    ok: bool | None


def trace_points(model: CLOCLlavaForConditionalGeneration) -> list[TracePoint]:
    """The modules along the path, in order."""
    layers = len(model.model.language_model.layers)
    # The ViT's last encoder layer (transformers' CLIP/SigLIP module paths differ between versions).
    vit_layers = [
        name
        for name, _ in model.named_modules()
        if name.startswith("model.vision_tower.vision_model.") and re.search(r"encoder\.layers\.\d+$", name)
    ]
    prompter = "model.vision_tower.prompter"
    points = [
        TracePoint("vision tower: ViT", "model.vision_tower.vision_model", "vision", "model", "model"),
        TracePoint("vision tower: last ViT layer", vit_layers[-1], "vision", None, "model"),
        TracePoint("image projector", "model.multi_modal_projector", "vision", None, "model"),
        TracePoint("prompter: box → point encoding", f"{prompter}.point_encoder", "geometry", "float32", "float32"),
        TracePoint("prompter: corner projection", f"{prompter}.corner_projection", "prompter", None, "model"),
        TracePoint("prompter: layer MLP", f"{prompter}.layer.mlp", "prompter", None, "model"),
        TracePoint("prompter: pool norm", f"{prompter}.pool_norm", "prompter", None, "model"),
        TracePoint("region projector", "model.region_projector", "prompter", None, "model"),
        TracePoint("LLM: embed_tokens", "model.language_model.embed_tokens", "LLM", None, "model"),
        TracePoint("LLM: inputs_embeds → decoder", "model.language_model", "LLM", "model", "model"),
        *[
            TracePoint(f"LLM: decoder layer {i}", f"model.language_model.layers.{i}", "LLM", "model", "model")
            for i in range(layers)
        ],
        TracePoint("LLM: final norm", "model.language_model.norm", "LLM", "model", "model"),
        TracePoint("LM head (logits)", "lm_head", "LLM", "model", "model"),
    ]
    names = dict(model.named_modules())
    return [point for point in points if point.module in names]


def _first_tensor(value: Any) -> torch.Tensor | None:
    """The first floating tensor in a module's input or output (tensors, tuples, dicts and ModelOutputs)."""
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else None
    items: Any = value.values() if isinstance(value, Mapping) else value if isinstance(value, list | tuple) else ()
    for item in items:
        tensor = _first_tensor(item)
        if tensor is not None:
            return tensor
    return None


def _dtype_name(tensor: torch.Tensor | None) -> str | None:
    return None if tensor is None else str(tensor.dtype).removeprefix("torch.")


class DtypeTracer:
    """Forward hooks recording the first call of each :class:`TracePoint` module while :meth:`recording`."""

    def __init__(self, model: nn.Module, points: Sequence[TracePoint]) -> None:
        self.points = list(points)
        self.seen: dict[str, tuple[str | None, str | None]] = {}
        self._active = False
        modules = dict(model.named_modules())
        self._handles = [
            modules[point.module].register_forward_hook(self._hook(point.module), with_kwargs=True)
            for point in self.points
        ]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self._active and name not in self.seen:
                self.seen[name] = (_dtype_name(_first_tensor((args, kwargs))), _dtype_name(_first_tensor(output)))

        return hook

    @contextmanager
    def recording(self) -> Iterator[DtypeTracer]:
        """Record calls inside the block (first call per module)."""
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def records(self, model_dtype: torch.dtype) -> list[DtypeRecord]:
        """One record per trace point (``"not called"`` when its module did not run)."""
        want = {"model": _dtype_name(torch.empty(0, dtype=model_dtype)), "float32": "float32", None: None}
        rows = []
        for point in self.points:
            got_in, got_out = self.seen.get(point.module, ("not called", "not called"))
            checks = [
                (want[expect], got)
                for expect, got in ((point.expect_input, got_in), (point.expect_output, got_out))
                if expect is not None
            ]
            expected = " → ".join(
                want[e] or "·" for e in (point.expect_input, point.expect_output)
            )  # e.g. "float32 → float32"
            ok = all(w == g for w, g in checks) if checks else None
            rows.append(DtypeRecord(point.label, point.module, point.part, got_in, got_out, expected, ok))
        return rows


def geometry_buffers(model: CLOCLlavaForConditionalGeneration) -> list[DtypeRecord]:
    """The prompter's geometry tables (sinusoid frequencies), which must stay fp32 in a bf16 model."""
    rows = []
    for name, buffer in model.model.vision_tower.prompter.named_buffers():
        if buffer.is_floating_point():
            dtype = _dtype_name(buffer)
            rows.append(
                DtypeRecord(
                    f"prompter buffer {name}",
                    f"model.vision_tower.prompter.{name}",
                    "geometry",
                    None,
                    dtype,
                    "· → float32",
                    dtype == "float32",
                )
            )
    return rows


def dtype_checks(records: Sequence[DtypeRecord]) -> dict[str, bool]:
    """``llm_activations_in_model_dtype``, ``geometry_fp32``, ``loss_fp32`` and ``all``: every checked record per
    part passed."""

    def passed(parts: tuple[str, ...]) -> bool:
        return all(r.ok is not False for r in records if r.part in parts)

    checks = {
        "llm_activations_in_model_dtype": passed(("LLM",)),
        "geometry_fp32": passed(("geometry",)),
        "loss_fp32": passed(("loss",)),
        "vision_and_projectors_in_model_dtype": passed(("vision", "prompter")),
    }
    checks["all"] = all(checks.values())
    return checks


# ----- inputs ------------------------------------------------------------------------------------------------------

REGION_BOXES = ((0.10, 0.20, 0.45, 0.70), (0.900, 0.300, 0.903, 0.950))
"""Original-frame boxes of the two ``<region>``s; the second is ~1.5 px wide on a 500-px image, near x = 0.9 (where
bf16 coordinates move in steps of 1/256)."""


def build_processor(config: CLOCLlavaConfig, tokenizer: PreTrainedTokenizerBase) -> CLOCLlavaProcessor:
    """The project's processor for ``config`` (image size, image tokens, box codec)."""
    return CLOCLlavaProcessor.from_model_config(config, tokenizer)


def stage2_batch(
    processor: CLOCLlavaProcessor, batch_size: int = 1, seed: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A stage-2 sample (``<image>`` + two ``<region>``s + answer) repeated ``batch_size`` times, through the
    processor (a random 500×375 image, padded to square). Returns the training batch (with ``labels``: the answer
    tokens only) and the generation prompt."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
    regions = [processor.format_region(box) for box in REGION_BOXES]
    prompt = f"USER: {IMAGE_TOKEN}\nWhat are {regions[0]} and {regions[1]}? ASSISTANT:"
    answer = " A red circle and a thin blue line.</s>"
    batch = processor(images=[image] * batch_size, text=[prompt + answer] * batch_size)
    prompt_inputs = processor(images=[image] * batch_size, text=[prompt] * batch_size)
    labels = batch["input_ids"].clone()
    labels[:, : prompt_inputs["input_ids"].shape[1]] = -100
    training = {**batch, "labels": labels}
    return dict(training), dict(prompt_inputs)


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
        "loss_dtype": _dtype_name(loss),
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
        "dtype": _dtype_name(torch.empty(0, dtype=dtype)),
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
