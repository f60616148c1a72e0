"""Vision-tower parts trained in MLLM stage 1 travel to stage 2 in ``mm_projector.safetensors``: stage 2 starts from
exactly the stage-1 prompter; a projector-only file loads as before; a tower tensor of the wrong shape is refused."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from cloc_encoder.data.format import read_region_text
from cloc_encoder.image_processing import CLOCImageProcessor
from mllm import CLOCVisionTower
from tests.conftest import build_tiny_cloc
from train.config import ConfigError
from train.mllm.build import assemble_model
from train.mllm.config import MLLMTrainConfig
from train.mllm.conversations import conversations_from_records, write_conversations
from train.mllm.projector import PROJECTOR_PREFIXES, load_projector
from train.mllm.train import MLLMTrainResult, train_mllm
from train.mllm.trainable import unwrap

PROMPTER = "model.vision_tower.prompter."
TINY_TEXT = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128}


def _config(data: Path, tower: Path, out: Path, **values: object) -> MLLMTrainConfig:
    settings: dict[str, object] = {
        "train_data": str(data),
        "vision_tower": str(tower),
        "output_dir": str(out),
        "batch_size": 4,
        "max_steps": 2,
        "save_every": 0,
        "max_length": 256,
        "tokenizer_vocab_size": 320,
        "model_overrides": {"text_config": dict(TINY_TEXT)},
        "progress_bar": False,
        "tensorboard": False,
        "device": "cpu",
    }
    settings.update(values)
    return MLLMTrainConfig(**settings)


def _prompter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unwrap(model).model.vision_tower.prompter.state_dict().items()}


@pytest.fixture(scope="module")
def setup(world: Path, tiny_cloc: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stage1_tower")
    tower = root / "tower"
    tiny_cloc.save_pretrained(tower)
    CLOCImageProcessor(image_size=32).save_pretrained(tower)
    data = root / "conv" / "train.json"
    records = read_region_text(world / "train.jsonl")
    write_conversations(conversations_from_records(records, out_dir=data.parent, tasks=["referring"]), data)
    return {"root": root, "tower": tower, "data": data}


@pytest.fixture(scope="module")
def tiny_cloc(caption_tokenizer):  # module scope for the module's stage-1 run (conftest's is per test)
    return build_tiny_cloc(caption_tokenizer)


@pytest.fixture(scope="module")
def stage1(setup: dict[str, Path]) -> MLLMTrainResult:
    config = _config(setup["data"], setup["tower"], setup["root"] / "stage1", tune_prompter=True, lr=1e-2)
    return train_mllm(config)


def _fresh_model(setup: dict[str, Path], stage1: MLLMTrainResult) -> torch.nn.Module:
    """Stage 2's base before the projector file: rebuilt from the tower folder and ``init_seed``."""
    tokenizer = AutoTokenizer.from_pretrained(stage1.output_dir / "tokenizer")
    return assemble_model(_config(setup["data"], setup["tower"], setup["root"] / "x", stage=2), tokenizer)


def test_stage1_prompter_travels_in_the_projector_file(setup, stage1, caplog):
    """Stage 1 changes the prompter and writes its trained tensors; stage 2 (prompter frozen) keeps exactly them."""
    initial = CLOCVisionTower.from_cloc(setup["tower"]).prompter.state_dict()
    after1 = _prompter(stage1.model)
    assert not torch.equal(after1["corner_embeddings"], initial["corner_embeddings"])
    trained = {n for n, p in unwrap(stage1.model).model.vision_tower.prompter.named_parameters() if p.requires_grad}
    with safe_open(str(stage1.mm_projector), framework="pt") as handle:
        assert json.loads(handle.metadata()["vision_tower_parts"]) == ["prompter"]
        keys = set(handle.keys())
    assert {k[len(PROMPTER) :] for k in keys if not k.startswith(PROJECTOR_PREFIXES)} == trained

    caplog.set_level(logging.INFO, logger="train.mllm.projector")
    stage2 = train_mllm(
        _config(
            setup["data"],
            setup["tower"],
            setup["root"] / "stage2",
            stage=2,
            max_steps=1,
            pretrain_mm_projector=str(stage1.mm_projector),
        )
    )
    assert stage2.trainable_parameters["vision"] == 0  # frozen in stage 2: what it ends with is what it started from
    before, after2 = unwrap(stage1.model).model.vision_tower, unwrap(stage2.model).model.vision_tower
    assert type(after2.prompter) is type(before.prompter)
    assert all(torch.equal(v, after1[k]) for k, v in _prompter(stage2.model).items())
    assert f"with {len(trained)} vision-tower tensors (parts: prompter)" in caplog.text
    assert "another base" not in caplog.text


def test_projector_only_file_loads_as_before(setup, stage1, tmp_path, caplog):
    """A file without tower tensors (nor the new metadata) loads the projectors and leaves the tower untouched."""
    state = {k: v for k, v in load_file(str(stage1.mm_projector)).items() if k.startswith(PROJECTOR_PREFIXES)}
    old = tmp_path / "mm_projector.safetensors"
    save_file(state, str(old), metadata={"format": "cloc-llava-projector"})
    model = _fresh_model(setup, stage1)
    tower = _prompter(model)
    caplog.set_level(logging.INFO, logger="train.mllm.projector")
    load_projector(model, tmp_path)  # a folder holding the file
    loaded = unwrap(model).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert all(torch.equal(v, tower[k]) for k, v in _prompter(model).items())
    assert "with 0 vision-tower tensors (parts: none)" in caplog.text


def test_tower_tensor_of_the_wrong_shape_or_name_is_refused(setup, stage1, tmp_path):
    state = load_file(str(stage1.mm_projector))
    model = _fresh_model(setup, stage1)
    key = PROMPTER + "corner_embeddings"
    for name, tensor in ((key, torch.zeros(3, 5)), ("model.vision_tower.nope.weight", torch.zeros(2))):
        bad = tmp_path / f"{name}.safetensors"
        save_file({**state, name: tensor}, str(bad))
        with pytest.raises(ConfigError, match=re.escape(name)) as error:
            load_projector(model, bad)
        assert str(bad) in str(error.value)
