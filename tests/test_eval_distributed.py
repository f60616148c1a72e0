"""Data-parallel evaluation (``torchrun``/``accelerate launch``): 2 CPU ranks give the single-process predictions and
metrics, shards of an interrupted run are reused whatever the world size, and only rank 0 scores."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cloc_encoder.data.format import read_region_text
from cloc_encoder.data.synthetic import SyntheticWorldConfig, generate_world
from eval.distributed import launch_context
from eval.mllm_generation import GenerationSettings, PredictionStore, answer_questions
from eval.predictions import shard_path, shard_paths
from eval.regions.tasks import referring_questions
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
from mllm.tiny import tiny_config
from tests.tiny_training import REPO, run_two_ranks, subprocess_env

TASKS = ("grounding", "referring")
TIMEOUT = 300


@pytest.fixture(scope="module")
def saved(tmp_path_factory, chat_tokenizer):
    """A tiny random CLOC-LLaVA (saved, and in memory) and a 4-image synthetic test split."""
    root = tmp_path_factory.mktemp("dp")
    generate_world(SyntheticWorldConfig(image_size=32), root / "world", {"test": 4})
    torch.manual_seed(0)
    config = tiny_config(chat_tokenizer, text_config={"initializer_range": 0.2})
    model = CLOCLlavaForConditionalGeneration._from_config(config).eval()
    processor = CLOCLlavaProcessor.from_model_config(config, chat_tokenizer)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root, model, processor


def _command(root, out):
    return [
        *(sys.executable, "-m", "eval", "regions", "--model", str(root / "model")),
        *("--data", str(root / "world" / "test.jsonl"), "--out", str(out)),
        *("--max-new-tokens", "8", "--batch-size", "3", "--no-progress"),
    ]


def _predictions(out, task):
    return PredictionStore(out / f"predictions_{task}.jsonl").predictions


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def test_two_ranks_match_one_process_and_resume_from_shards(saved):
    root, _, _ = saved
    env = {k: v for k, v in subprocess_env().items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    single = subprocess.run(
        _command(root, root / "one"), cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert single.returncode == 0, single.stderr[-4000:]
    outputs = run_two_ranks(_command(root, root / "two"), timeout=TIMEOUT)
    assert "| grounding | Acc@0.5 |" in outputs[0] and "| task |" not in outputs[1]  # only rank 0 scores and prints

    one, two = root / "one", root / "two"
    assert _metrics(two) == _metrics(one)
    assert (two / "metrics.md").read_text() == (one / "metrics.md").read_text()
    assert json.loads((two / "eval_run.json").read_text()) == json.loads((one / "eval_run.json").read_text())
    for task in TASKS:
        assert _predictions(two, task) == _predictions(one, task)
        assert not shard_paths(two / f"predictions_{task}.jsonl")  # merged, then removed
    assert len({p["answer"] for p in _predictions(one, "referring").values()}) > 1

    # An interrupted run: a third of the answers in the canonical file, the rest in the two ranks' shards, rank 1
    # killed two answers early (mid-line). Reused answers are tagged to tell them from regenerated ones.
    deleted = {}
    for task in TASKS:
        canonical = two / f"predictions_{task}.jsonl"
        items = [{**json.loads(line), "reused": True} for line in canonical.read_text().splitlines()]
        kept, rest = items[: len(items) // 3], items[len(items) // 3 :]
        shards = [rest[0::2], rest[1::2][:-2]]
        deleted[task] = {item["id"] for item in rest[1::2][-2:]}
        canonical.write_text("".join(json.dumps(item) + "\n" for item in kept))
        for rank, lines in enumerate(shards):
            text = "".join(json.dumps(item) + "\n" for item in lines)
            shard_path(canonical, rank, 2).write_text(text + ('{"id": "torn", "ans' if rank else ""))
    (two / "metrics.json").unlink()
    run_two_ranks(_command(root, two), timeout=TIMEOUT)

    for task in TASKS:
        resumed, reference = _predictions(two, task), _predictions(one, task)
        assert set(resumed) == set(reference) and not shard_paths(two / f"predictions_{task}.jsonl")
        regenerated = {i for i, p in resumed.items() if not p.get("reused")}
        assert regenerated == deleted[task]
        assert all({k: v for k, v in resumed[i].items() if k != "reused"} == reference[i] for i in resumed)
        lines = (two / f"predictions_{task}.jsonl").read_text().splitlines()
        assert len(lines) == len(reference)  # no id twice
    assert _metrics(two) == _metrics(one)


def test_one_process_reuses_the_shards_of_any_world_size(saved, tmp_path):
    root, model, processor = saved
    records = read_region_text(root / "world" / "test.jsonl")
    questions = referring_questions(records, processor.codec)[0][:5]
    store_path = tmp_path / "predictions.jsonl"
    shard_path(store_path, 2, 3).write_text(json.dumps({"id": questions[1].id, "answer": "from rank 2"}) + "\n")
    shard_path(store_path, 0, 3).write_text(json.dumps({"id": questions[3].id, "answer": "from rank 0"}) + "\n")
    (tmp_path / "predictions_other.rank0-of-3.jsonl").write_text("not a shard of this store\n")
    assert shard_paths(store_path) == [shard_path(store_path, 0, 3), shard_path(store_path, 2, 3)]

    predictions = answer_questions(
        model, processor, questions, PredictionStore(store_path), GenerationSettings(4, 2), progress=False
    )
    assert predictions is not None and list(predictions) == [q.id for q in questions]
    assert predictions[questions[1].id]["answer"] == "from rank 2"
    assert predictions[questions[3].id]["answer"] == "from rank 0"
    assert not shard_paths(store_path) and (tmp_path / "predictions_other.rank0-of-3.jsonl").exists()
    assert len(store_path.read_text().splitlines()) == len(questions)


def test_a_launch_takes_each_ranks_own_gpu(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch_context("cpu").world_size == 1 and launch_context("cpu").device.type == "cpu"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
        launch_context("cuda:1")
