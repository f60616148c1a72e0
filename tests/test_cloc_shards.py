"""Streamed CLOC data: tar shards written from region-text JSONL, read back, split over ranks and workers, corrupt
samples skipped, resumed at shard granularity, and trained on (the learning test's fixture trains from shards)."""

from __future__ import annotations

import itertools
import json
import logging
import sys
from pathlib import Path

import pytest

from cloc_encoder.data.format import read_region_text
from cloc_encoder.data.shards import (
    encode_sample,
    expand_shards,
    is_shard_spec,
    iter_shard_records,
    main,
    sample_key,
    shard_name,
    write_tar_shard,
)
from tests.shard_stream_worker import ids_collate, ids_encoder
from tests.test_train_cloc import tiny_config
from tests.tiny_training import run_two_ranks
from train.cloc.pretrain import train_cloc
from train.cloc.streaming import ShardPlan, StreamingBatches, TooManySkipsError, shard_plan
from train.metrics import read_metrics


@pytest.fixture(scope="module")
def shards(world, tmp_path_factory) -> Path:
    """The 32 training images of ``world`` in 8 shards of 4 (through the command line)."""
    out = tmp_path_factory.mktemp("shards")
    assert main(["--data", str(world / "train.jsonl"), "--out", str(out), "--samples-per-shard", "4"]) == 0
    return out


def pattern(folder: Path, count: int = 8) -> str:
    return f"{folder}/shard-{{00000..{count - 1:05d}}}.tar"


def stream(spec: str, batch_size: int, **options) -> StreamingBatches:
    rank, world_size = options.pop("rank", 0), options.pop("world_size", 1)
    plan = shard_plan(spec, None, batch_size=batch_size, world_size=world_size, seed=0)
    return StreamingBatches(plan, ids_encoder, ids_collate, rank=rank, **options)


def test_converter_writes_the_records_and_sizes(world, shards):
    records = read_region_text(world / "train.jsonl")
    assert json.loads((shards / "sizes.json").read_text()) == {f"shard-{i:05d}.tar": 4 for i in range(8)}
    back = list(iter_shard_records(expand_shards(pattern(shards))))
    assert [r.id for r in back] == [r.id for r in records]
    assert [r.regions for r in back] == [r.regions for r in records]  # boxes: the same normalised xyxy
    assert (back[0].width, back[0].height, back[0].caption) == (records[0].width, records[0].height, records[0].caption)
    assert is_shard_spec(pattern(shards)) and is_shard_spec("pipe:aws s3 cp s3://b/x/shard-{0..3}.tar -")
    assert not is_shard_spec(str(world / "train.jsonl"))
    assert shard_name("pipe:curl -s https://host/data/shard-00007.tar") == "shard-00007.tar"
    assert not list(shards.glob(".*.tmp"))  # written atomically, nothing left behind


def test_plan_gives_equal_batches_and_drops_only_the_documented_remainder():
    plan = ShardPlan(tuple(f"s-{i}.tar" for i in range(5)), (10, 10, 10, 10, 3), batch_size=4, world_size=2)
    assert plan.guaranteed_samples == 13 and plan.batches_per_epoch == 3  # the 2 smallest shards: 3 + 10
    for epoch in range(3):
        a, b = plan.rank_shards(epoch, 0), plan.rank_shards(epoch, 1)
        assert not set(a) & set(b) and sorted(a + b) == sorted(plan.urls)
    with pytest.raises(ValueError, match="2 shards cannot feed 3 ranks"):
        ShardPlan(("a.tar", "b.tar"), (4, 4), batch_size=2, world_size=3)


def test_one_epoch_sees_every_sample_once_with_workers_and_a_shuffle_buffer(world, shards):
    ids = [r.id for r in read_region_text(world / "train.jsonl")]
    batches = list(itertools.islice(iter(stream(pattern(shards), 8, num_workers=2, shuffle_buffer=6)), 5))
    epoch = [i for b in batches[:4] for i in b["ids"]]
    assert all(len(b["ids"]) == 8 for b in batches) and sorted(epoch) == sorted(ids)
    assert epoch != ids  # shuffled (shard order and buffer)


def test_resume_reads_only_unfinished_shards_and_repeats_only_open_ones(shards, caplog):
    first = stream(pattern(shards), 8, shuffle_buffer=0)
    before = [i for b in itertools.islice(iter(first), 2) for i in b["ids"]]
    state = json.loads(json.dumps(first.state_dict()))
    assert (state["epoch"], state["position"]) == (0, 2) and len(state["finished_shards"]) == 4

    resumed = stream(pattern(shards), 8, shuffle_buffer=0)
    resumed.load_state_dict(state)
    resumed.start = 2
    with caplog.at_level(logging.INFO, logger="train.cloc.streaming"):
        after = [i for b in itertools.islice(iter(resumed), 2) for i in b["ids"]]
    assert "4 finished shards are not read again" in caplog.text
    assert not set(before) & set(after) and len(set(before + after)) == 32  # nothing repeated here, nothing lost
    assert resumed.state_dict()["epoch"] == 1  # the epoch ended after its 4 batches


def test_corrupt_samples_are_skipped_counted_and_too_many_stop(world, tmp_path):
    records = read_region_text(world / "train.jsonl")[:12]
    samples = []
    for position, record in enumerate(records):
        sample = encode_sample(record, record.image_path.read_bytes(), "png", sample_key(position))
        if position in (2, 7):
            sample["png"] = b"not a png"
        if position == 4:
            sample["json"] = b"{broken"
        samples.append(sample)
    write_tar_shard(tmp_path / "shard-00000.tar", samples[:6])
    write_tar_shard(tmp_path / "shard-00001.tar", samples[6:])
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-00000.tar": 6, "shard-00001.tar": 6}))
    spec = f"{tmp_path}/shard-{{00000..00001}}.tar"
    batches = list(itertools.islice(iter(stream(spec, 3, shuffle_buffer=0)), 3))
    skipped = [m for b in batches for m in b["skipped"]]
    assert [len(b["ids"]) for b in batches] == [3, 3, 3] and len(skipped) == 3
    assert sum(records[2].id in m and "UnidentifiedImageError" in m for m in skipped) == 1
    assert sum("shard-00000.tar:000000000004: invalid JSON" in m for m in skipped) == 1

    bad = [encode_sample(r, b"garbage", "jpg", sample_key(i)) for i, r in enumerate(records)] * 2
    for i, sample in enumerate(bad):
        sample["__key__"] = sample_key(i)
    write_tar_shard(tmp_path / "bad" / "shard-00000.tar", bad)
    (tmp_path / "bad" / "sizes.json").write_text(json.dumps({"shard-00000.tar": 24}))
    with pytest.raises(TooManySkipsError, match="11 of 11 samples could not be used"):
        next(iter(stream(f"{tmp_path}/bad/shard-00000.tar", 2, shuffle_buffer=0)))


@pytest.mark.timeout(300)
def test_two_gloo_ranks_read_disjoint_shards_with_equal_batches(world, shards, tmp_path):
    out = tmp_path / "ranks.json"
    command = [sys.executable, "-m", "tests.shard_stream_worker", pattern(shards), "4", str(out)]
    run_two_ranks(command, timeout=240)
    result = json.loads(out.read_text())
    ranks = result["ranks"]
    assert [len(r["batches"]) for r in ranks] == [result["batches_per_epoch"]] * 2 == [4, 4]
    assert all(len(batch) == 4 for r in ranks for batch in r["batches"])
    assert not set(ranks[0]["shards"]) & set(ranks[1]["shards"])
    seen = [i for r in ranks for batch in r["batches"] for i in batch]
    assert sorted(seen) == sorted(r.id for r in read_region_text(world / "train.jsonl"))  # each sample once


class _Crash(RuntimeError):
    pass


def test_training_from_shards_survives_a_crash_and_resumes_where_it_stopped(shards, world, tmp_path, caplog):
    """Killed after the step-2 checkpoint (8 shards of 4, batch 8, no shuffle buffer: 4 shards finished), the
    resumed run does not start over: it reads only the 4 unfinished shards and its metrics continue at step 3."""
    options = {"train_data": pattern(shards), "shuffle_buffer": 0, "save_every": 2, "max_steps": 6}

    def crash(state) -> None:
        if state.step == 3:
            raise _Crash

    with pytest.raises(_Crash):
        train_cloc(tiny_config(world, tmp_path / "run", **options), step_callback=crash)
    saved = json.loads((tmp_path / "run" / "step-000002" / "data_state_rank0.json").read_text())
    assert (saved["epoch"], saved["position"], len(saved["finished_shards"])) == (0, 2, 4)
    with caplog.at_level(logging.INFO, logger="train.cloc.streaming"):
        result = train_cloc(tiny_config(world, tmp_path / "run", resume=True, **options))
    assert "rank 0 resumes epoch 0 at batch 2/4; 4 finished shards are not read again" in caplog.text
    assert result.step == 6 and result.epoch == 1 and result.skipped_images == 0
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6], steps  # step 3 of the crashed run is replaced, nothing restarts at 1
    assert [r["step"] for r in result.log_history if "loss" in r] == [1, 2, 3, 4, 5, 6]
