"""Shared fixtures: tiny models built from configs and an offline tokenizer (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny_training import PRETRAIN_STEPS, PretrainedCLOC

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]

CAPTIONS = [
    f"a {size} {colour} {shape} {relation}"
    for size in ("small", "large")
    for colour in ("red", "green", "blue", "yellow")
    for shape in ("circle", "square", "triangle")
    for relation in ("", "left of the square", "above the circle", "below the red triangle")
]


@pytest.fixture(scope="session")
def caption_tokenizer():
    from cloc_encoder.tokenization import train_caption_tokenizer

    return train_caption_tokenizer(CAPTIONS, vocab_size=128, model_max_length=16)


def build_tiny_cloc(caption_tokenizer):
    """A 1-layer CLOC encoder on 32-px images (fast), seeded."""
    import torch

    from cloc_encoder.factory import build_cloc_model

    torch.manual_seed(0)
    return build_cloc_model(
        "tiny",
        caption_tokenizer,
        vision_config={"num_hidden_layers": 1, "image_size": 32, "hidden_size": 64, "intermediate_size": 128},
        text_config={
            "num_hidden_layers": 1,
            "hidden_size": 64,
            "intermediate_size": 128,
            "max_position_embeddings": 16,
        },
        projection_dim=32,
    ).eval()


@pytest.fixture()
def tiny_cloc(caption_tokenizer):
    """A 1-layer CLOC encoder on 32-px images (fast)."""
    return build_tiny_cloc(caption_tokenizer)


@pytest.fixture(scope="session")
def chat_tokenizer():
    """Offline byte-level BPE with ``<image>``/``<region>`` and the Vicuna chat template (for MLLM tests)."""
    from mllm.tiny import TINY_CORPUS
    from mllm.tokenization import train_chat_tokenizer

    return train_chat_tokenizer(TINY_CORPUS, vocab_size=320)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 32-px synthetic world: 32 train and 8 val images (for training tests)."""
    from cloc_encoder.data.synthetic import SyntheticWorldConfig, generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(SyntheticWorldConfig(image_size=32), out, {"train": 32, "val": 8})
    return out


@pytest.fixture(scope="session")
def pretrained_cloc(tmp_path_factory) -> PretrainedCLOC:
    """CLOC pretraining with the shipped recipe (train/configs/cloc_tiny.yaml), shared by the learning tests.

    It streams WebDataset tar shards converted from the world's ``train.jsonl`` (8 shards of 250 images), so the
    learning test's bars, set from JSONL runs, compare the two pipelines (JSONL training: tests/test_train_cloc.py).
    """
    from cloc_encoder.data.format import read_region_text
    from cloc_encoder.data.shards import write_shards
    from cloc_encoder.data.synthetic import SyntheticWorldConfig, generate_world
    from train.cloc.config import load_config
    from train.cloc.pretrain import train_cloc

    root = tmp_path_factory.mktemp("pretrained_cloc")
    world = root / "world"
    generate_world(SyntheticWorldConfig(), world, {"train": 2000, "test": 200})
    write_shards(read_region_text(world / "train.jsonl"), world / "shards", samples_per_shard=250)
    config = load_config(
        REPO / "train/configs/cloc_tiny.yaml",
        [
            f"train_data={world / 'shards'}/shard-{{00000..00007}}.tar",
            "val_data=null",
            f"output_dir={root / 'run'}",
            f"max_steps={PRETRAIN_STEPS}",
            f"save_every={PRETRAIN_STEPS}",
            "progress_bar=false",
            "tensorboard=false",
        ],
    ).validate()
    return PretrainedCLOC(world, train_cloc(config))
