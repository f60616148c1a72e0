"""ZeRO-3 that shards at load time, with 2 CPU processes (gloo): every rank holds about half of the model right
after it is built (a ~240M-parameter Llama from config), the same base as without DeepSpeed when built from
folders, stage 1 → stage 2 training, and a saved ``model.safetensors`` gathered from the shards that reloads with
the same logits. The ranks run :mod:`tests.zero3_worker`."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, LlamaConfig, LlamaForCausalLM

import mllm  # noqa: F401 - registers the Auto classes
from cloc_encoder.data.format import read_region_text
from cloc_encoder.factory import build_cloc_model
from cloc_encoder.image_processing import CLOCImageProcessor
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
from tests.tiny_training import run_two_ranks
from tests.zero3_worker import probe_inputs
from train.mllm.conversations import conversations_from_records, write_conversations

pytest.importorskip("deepspeed")

BIG_TEXT_CONFIG = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 8000,
}
"""The wide LLM of the sharded-build check: 4 × 2048 (5632 MLP), vocabulary 8000: ~238M parameters (0.95 GB in
fp32) in few, large matrices (few gathers: fast to build under zero.Init), none over 16.4M elements."""


def _folders(tmp_path: Path, chat_tokenizer, caption_tokenizer) -> tuple[Path, Path]:
    """A tiny CLOC encoder folder and a tiny Llama folder whose vocabulary lacks ``<image>``/``<region>``."""
    tower_dir, llm_dir = tmp_path / "cloc", tmp_path / "llm"
    torch.manual_seed(0)
    cloc = build_cloc_model(
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
    )
    cloc.save_pretrained(tower_dir)
    CLOCImageProcessor(image_size=32, resize_mode="squash").save_pretrained(tower_dir)
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = None
    torch.manual_seed(1)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer) - 2,  # the tokenizer grew after the LLM was trained: embeddings are resized
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    llm.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    return tower_dir, llm_dir


def test_zero3_shards_at_load_time_trains_and_saves_full_weights(
    world, chat_tokenizer, caption_tokenizer, tmp_path, monkeypatch
):
    records = read_region_text(world / "train.jsonl")
    data = world / "conv" / "zero3.json"
    write_conversations(
        conversations_from_records(records, out_dir=data.parent, tasks=["grounding", "referring"]), data
    )
    tower_dir, llm_dir = _folders(tmp_path, chat_tokenizer, caption_tokenizer)
    out = tmp_path / "runs"
    out.mkdir()
    spec = {
        "data": str(data),
        "out": str(out),
        "tower": str(tower_dir),
        "llm": str(llm_dir),
        "big_text_config": BIG_TEXT_CONFIG,
    }
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec), encoding="utf-8")
    # glibc's adaptive mmap threshold keeps freed gathered layers in the heap and would inflate the ranks' RSS
    # (a fragmentation effect, not held parameters); a fixed threshold returns them, so RSS shows what is held.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    run_two_ranks([sys.executable, "-m", "tests.zero3_worker", str(spec_file)], timeout=400)
    reports = [json.loads((out / f"report_rank{rank}.json").read_text()) for rank in range(2)]

    # 1. Right after the build each rank holds half of the ~247M parameters (padding aside), and its peak memory
    #    stays well below the full fp32 model, which a build without DeepSpeed needs on every rank.
    full = reports[0]["build"]["sharded"]["full"]
    assert full > 200_000_000
    for report in reports:
        sharded, plain = report["build"]["sharded"], report["build"]["plain"]
        assert sharded["partitioned"] == sharded["parameters"] and plain["partitioned"] == 0
        assert sharded["full"] == plain["full"] == plain["local"] == full
        assert abs(sharded["local"] - full / 2) < 0.001 * full
        model_mib = 4 * full / 2**20
        assert sharded["peak_mib"] - sharded["rss_before_mib"] < 0.85 * model_mib, report["build"]
        assert plain["peak_mib"] - plain["rss_before_mib"] > 0.9 * model_mib, report["build"]
    assert (
        sum(r["build"]["sharded"]["local"] for r in reports) - full < 2 * reports[0]["build"]["sharded"]["parameters"]
    )

    # 2. Built from folders (vocabulary resized, projectors from init_seed) the ZeRO-3 base equals the plain one.
    base = reports[0]["same_base"]
    assert base["keys_equal"] and base["max_abs_diff"] == 0.0
    assert all(r["same_base"]["partitioned"] == r["same_base"]["parameters"] for r in reports)

    # 3. Stage 1 → stage 2 trained under ZeRO-3 (the stage-2 model still partitioned), and the checkpoint's
    #    model.safetensors — gathered from the shards — reloads in this process with the same logits.
    training = reports[0]["training"]
    assert len(training["stage1_losses"]) == 2 and len(training["stage2_losses"]) == 2
    assert all(math.isfinite(loss) for loss in training["stage1_losses"] + training["stage2_losses"])
    assert training["stage2_trainable"]["llm"] > 0
    for partition in (training["stage2_partition"], training["model_path_partition"]):
        assert partition["partitioned"] == partition["parameters"] and partition["local"] < 0.6 * partition["full"]
    assert training["model_path_max_abs_diff"] == 0.0
    checkpoint = Path(training["stage2_checkpoint"])
    expected = load_file(str(out / "logits.safetensors"))["logits"]
    processor = CLOCLlavaProcessor.from_pretrained(checkpoint)
    for loader in (AutoModelForImageTextToText, CLOCLlavaForConditionalGeneration):
        model = loader.from_pretrained(checkpoint).eval()
        assert isinstance(model, CLOCLlavaForConditionalGeneration)
        with torch.no_grad():
            logits = model(**probe_inputs(processor)).logits
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
