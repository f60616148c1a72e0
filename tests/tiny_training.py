"""Shared by the training tests: a 1-layer CLOC encoder on 32-px images, a 2-process launcher, and what the
``pretrained_cloc`` fixture (conftest) returns."""

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloc_encoder.distributed import free_port

REPO = Path(__file__).resolve().parents[1]

TINY_CLOC_OVERRIDES = {
    "vision_config": {"image_size": 32, "num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128},
    "text_config": {
        "num_hidden_layers": 1,
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 16,
    },
    "projection_dim": 32,
}


def subprocess_env() -> dict[str, str]:
    """Environment for training subprocesses: offline, one thread, the repository importable, a cached
    DeepSpeed extension folder."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "cloc-mllm" / "torch_extensions"))
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return env


def run_two_ranks(command: list[str], timeout: float) -> list[str]:
    """Run ``command`` as ranks 0 and 1 of a 2-process group (``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` and a free
    ``MASTER_PORT`` on 127.0.0.1); assert that both exit 0 and return their combined outputs."""
    env = {**subprocess_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    processes = [
        subprocess.Popen(
            command,
            cwd=REPO,
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    for rank, (process, output) in enumerate(zip(processes, outputs, strict=True)):
        assert process.returncode == 0, f"rank {rank} failed:\n{output[-4000:]}"
    return outputs


@dataclass(frozen=True)
class PretrainedCLOC:
    """The synthetic world (64 px: 2000 train, 200 test images) and a tiny CLOC encoder trained on it."""

    world: Path
    result: Any  # train.cloc.pretrain.TrainResult


PRETRAIN_STEPS = 450
"""CLOC pretraining steps of :func:`pretrained_cloc` (batch 64; about 3 minutes here)."""
