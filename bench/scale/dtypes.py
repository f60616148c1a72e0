"""Dtype tracing along a CLOC-LLaVA's path: forward hooks record each traced module's input and output dtype, and
the checks say whether the language model ran in the model's dtype and the box geometry and loss in fp32."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mllm import CLOCLlavaForConditionalGeneration


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


def dtype_name(tensor: torch.Tensor | None) -> str | None:
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
                self.seen[name] = (dtype_name(_first_tensor((args, kwargs))), dtype_name(_first_tensor(output)))

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
        want = {"model": dtype_name(torch.empty(0, dtype=model_dtype)), "float32": "float32", None: None}
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
            dtype = dtype_name(buffer)
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
