"""What every GPU-check part shares: the run's settings, the context handed to a part, a part and its result, how a
part says it is skipped, and the wheels that would complete a skipped part."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.scale.shapes import LLAVA_7B_SHAPE, SMOKE_SHAPE, ModelShape

TESTED_WHEELS = {
    "deepspeed": "deepspeed==0.19.8",
    "bitsandbytes": "bitsandbytes==0.50.2",
    "peft": "peft==0.21.2",
    "accelerate": "accelerate==1.15.0",
}
"""Versions measured together with this project (docs/installation.md, requirements.txt)."""


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
