"""Two-process CLOC pretraining on CPU (gloo): DeepSpeed ZeRO-2 (train, save, resume) and torchrun DDP.

DeepSpeed JIT-builds its ``deepspeed_shm_comm`` extension on first use (~40 s); it is cached under
``TORCH_EXTENSIONS_DIR`` (default here: ``~/.cache/cloc-mllm/torch_extensions``; cache it in CI).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cloc_encoder import CLOCModel
from cloc_encoder.distributed import free_port
from tests.tiny_training import TINY_CLOC_OVERRIDES as TINY_MODEL
from tests.tiny_training import run_two_ranks, subprocess_env
from train.cloc.config import CLOCTrainConfig
from train.cloc.pretrain import train_cloc
from train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


def _config(world: Path, output_dir: Path, **values) -> CLOCTrainConfig:
    settings = {
        "train_data": str(world / "train.jsonl"),
        "val_data": str(world / "val.jsonl"),
        "output_dir": str(output_dir),
        "model_overrides": json.loads(json.dumps(TINY_MODEL)),
        "tokenizer_vocab_size": 128,
        "batch_size": 4,
        "max_steps": 3,
        "warmup_steps": 1,
        "log_every": 1,
        "save_every": 0,
        "progress_bar": False,
        "device": "cpu",
    }
    settings.update(values)
    return CLOCTrainConfig(**settings)


def _launch_two(config_path: Path, *extra: str) -> list[str]:
    """Run ``python -m train.cloc_pretrain`` as ranks 0 and 1 of a 2-process gloo group."""
    return run_two_ranks([sys.executable, "-m", "train.cloc_pretrain", "--config", str(config_path), *extra], TIMEOUT_S)


def test_deepspeed_zero2_two_processes_train_save_resume(world, tmp_path):
    output_dir = tmp_path / "ds"
    config_path = tmp_path / "ds.yaml"
    _config(world, output_dir, deepspeed=str(REPO / "train/deepspeed/zero2.json")).save_yaml(config_path)
    _launch_two(config_path)

    records = read_metrics(output_dir)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    assert all(math.isfinite(r[key]) for r in train_records for key in ("loss", "loss_clip", "loss_region"))
    assert any("val_loss" in r for r in records)
    checkpoint = output_dir / "step-000003"
    assert (output_dir / "latest").read_text().strip() == checkpoint.name
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "deepspeed").is_dir()
    assert {p.name for p in checkpoint.glob("rng_state_rank*.json")} == {"rng_state_rank0.json", "rng_state_rank1.json"}
    model = CLOCModel.from_pretrained(checkpoint)  # usable without DeepSpeed
    assert model.logit_scale.shape == ()  # scalars go back to their checkpoint shape

    # The contrastive loss gathers across ranks: step 1 of 2 x 4 images equals one process with 8 images.
    single = train_cloc(_config(world, tmp_path / "single", batch_size=8, max_steps=1, val_data=None))
    assert train_records[0]["loss_clip"] == pytest.approx(single.metrics["loss_clip"], abs=1e-5)

    _launch_two(config_path, "--resume", "max_steps=4")
    resumed = [r for r in read_metrics(output_dir) if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] and resumed[:3] == train_records
    assert math.isfinite(resumed[-1]["loss"]) and resumed[-1]["lr"] > 0
    assert (output_dir / "latest").read_text().strip() == "step-000004"
    state = json.loads((output_dir / "step-000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["world_size"] == 2


def test_torchrun_ddp_two_processes(world, tmp_path):
    output_dir = tmp_path / "ddp"
    config_path = tmp_path / "ddp.yaml"
    _config(world, output_dir, max_steps=2, val_data=None).save_yaml(config_path)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "train.cloc.pretrain",
        "--config",
        str(config_path),
    ]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    train_records = [r for r in read_metrics(output_dir) if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    single = train_cloc(_config(world, tmp_path / "single", batch_size=8, max_steps=1, val_data=None))
    assert train_records[0]["loss_clip"] == pytest.approx(single.metrics["loss_clip"], abs=1e-5)
    model = CLOCModel.from_pretrained(output_dir / "step-000002")
    assert torch.isfinite(model.logit_scale).all()


RANK_WITHOUT_REGIONS = """
import datetime, os, sys
import torch
from torch import distributed as dist
from cloc_encoder.factory import build_cloc_model
from cloc_encoder.tokenization import train_caption_tokenizer

rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
tokenizer = train_caption_tokenizer(["a red circle", "a blue square left of the circle"], 64, 16)
torch.manual_seed(0)
model = build_cloc_model(
    "tiny", tokenizer, vision_config={"image_size": 32, "num_hidden_layers": 1},
    text_config={"num_hidden_layers": 1, "max_position_embeddings": 16},
)
ids = tokenizer(["a red circle"] * 2, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
regions = 0 if rank == 1 else 3
output = model(
    pixel_values=torch.randn(2, 3, 32, 32), input_ids=ids, attention_mask=torch.ones_like(ids),
    region_boxes=torch.tensor([[0.1, 0.1, 0.5, 0.5]] * regions).reshape(-1, 4),
    region_image_index=torch.zeros(regions, dtype=torch.long),
    region_input_ids=ids[:1].repeat(regions, 1), region_attention_mask=torch.ones(regions, 16, dtype=torch.long),
)
output.loss.backward()
assert torch.isfinite(output.loss) and (output.region_weight == 0.0) == (rank == 1)
print("ok", rank, float(output.loss.detach()))
"""


def test_rank_without_regions_joins_the_region_gathers(tmp_path):
    """A rank whose batch has no regions must not leave the others waiting in the region-loss collectives."""
    script = tmp_path / "no_regions.py"
    script.write_text(RANK_WITHOUT_REGIONS)
    run_two_ranks([sys.executable, str(script)], timeout=180)
