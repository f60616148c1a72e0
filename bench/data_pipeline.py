"""Data pipeline throughput and memory: streamed tar shards against the map-style JSONL data set, alone and feeding
the tiny CLOC recipe (is the loader ever the bottleneck?), and a rank's memory while streaming a whole epoch.

The data is the synthetic world (64-px images) of ``--images`` training images, written as region-text JSONL and
converted to tar shards of 1000 samples (cached in ``--root``). Loader rates are samples/s over whole batches of
``--batch-size`` with ``--workers`` DataLoader workers; "train" rates run the tiny recipe's model
(train/configs/cloc_tiny.yaml) forward + backward + AdamW on the loader's batches; "model only" repeats one batch.
Memory is the resident set of the rank's process plus its workers, sampled every 10 batches of the tar epoch.

    python -m bench.data_pipeline --images 20000 --workers 2
    python -m bench.data_pipeline --images 400 --quick
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import torch

from cloc_encoder.data.format import read_region_text
from cloc_encoder.data.shards import SIZES_FILE, write_shards
from cloc_encoder.data.synthetic import SyntheticWorldConfig, generate_world, world_is_current
from cloc_encoder.image_processing import CLOCImageProcessor
from cloc_encoder.tokenization import train_caption_tokenizer
from train.cloc.build import build_model, build_optimizer, text_length, training_texts
from train.cloc.config import load_config
from train.cloc.data import RegionTextDataset, RegionTextEncoder, collate_cloc
from train.cloc.streaming import StreamingBatches, shard_plan
from train.samplers import ResumableBatchSampler

REPO = Path(__file__).resolve().parents[1]
SAMPLES_PER_SHARD = 1000


def prepare(root: Path, images: int) -> tuple[Path, str]:
    """The world's ``train.jsonl`` and a brace pattern of its tar shards (generated once, then reused)."""
    world = root / f"world-{images}"
    sizes = {"train": images}
    if not world_is_current(SyntheticWorldConfig(), world, sizes):
        generate_world(SyntheticWorldConfig(), world, sizes)
    shards = world / "shards"
    if not (shards / SIZES_FILE).is_file():
        write_shards(read_region_text(world / "train.jsonl"), shards, SAMPLES_PER_SHARD)
    count = -(-images // SAMPLES_PER_SHARD)
    return world / "train.jsonl", f"{shards}/shard-{{00000..{count - 1:05d}}}.tar"


def rss_mib() -> float:
    """Resident memory of this process and its children (DataLoader workers), MiB."""
    process = psutil.Process()
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def rate(batches: Iterator[Any], count: int, batch_size: int, step: Any = None) -> float:
    """Samples/s over ``count`` batches (after one warm-up batch), running ``step(batch)`` on each when given."""
    first = next(batches)
    if step is not None:
        step(first)
    start = time.perf_counter()
    for batch in itertools.islice(batches, count):
        if step is not None:
            step(batch)
    return count * batch_size / (time.perf_counter() - start)


def run(images: int, workers: int, batch_size: int, batches: int, root: Path) -> dict[str, Any]:
    jsonl, pattern = prepare(root, images)
    records = read_region_text(jsonl)
    config = load_config(REPO / "train/configs/cloc_tiny.yaml", [f"batch_size={batch_size}", "device=cpu"])
    tokenizer = train_caption_tokenizer(training_texts(records[:2000]), config.tokenizer_vocab_size, 32)
    model = build_model(config, tokenizer).train()
    processor = CLOCImageProcessor.for_model(model.config, resize_mode=config.resize_mode)
    length = text_length(config, model)
    encoder = RegionTextEncoder(processor, tokenizer, max_regions=4, max_length=length)
    optimizer = build_optimizer(model, config)

    def step(batch: Any) -> None:
        model(**batch.inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def jsonl_batches() -> Iterator[Any]:
        dataset = RegionTextDataset(records, processor, tokenizer, max_regions=4, max_length=length)
        sampler = ResumableBatchSampler(len(dataset), batch_size)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate_cloc, num_workers=workers, persistent_workers=True
        )
        return iter(loader)

    plan = shard_plan(pattern, None, batch_size=batch_size, world_size=1, seed=0)

    def tar_batches() -> Iterator[Any]:
        return iter(StreamingBatches(plan, encoder, collate_cloc, num_workers=workers, shuffle_buffer=1000))

    result: dict[str, Any] = {"images": images, "workers": workers, "batch_size": batch_size, "batches": batches}
    result["loader_jsonl"] = rate(jsonl_batches(), batches, batch_size)
    result["loader_tar"] = rate(tar_batches(), batches, batch_size)
    result["train_jsonl"] = rate(jsonl_batches(), batches, batch_size, step)
    result["train_tar"] = rate(tar_batches(), batches, batch_size, step)
    fixed = next(tar_batches())
    result["model_only"] = rate(itertools.repeat(fixed), batches, batch_size, step)
    # memory over one whole tar epoch (no model)
    samples, trace = 0, []
    start = time.perf_counter()
    for number, _ in enumerate(itertools.islice(tar_batches(), plan.batches_per_epoch), start=1):
        samples += batch_size
        if number % 10 == 0 or number == plan.batches_per_epoch:
            trace.append((samples, round(rss_mib(), 1)))
    result["epoch_tar_samples_per_s"] = samples / (time.perf_counter() - start)
    result["rss_mib_trace"] = trace
    result["rss_mib_first_10pct"] = max(m for s, m in trace if s <= samples // 10 or s == trace[0][0])
    result["rss_mib_peak"] = max(m for _, m in trace)
    result["rss_mib_last"] = trace[-1][1]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.data_pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per rate")
    parser.add_argument("--root", default="runs/bench_data", help="cache folder of the world and its shards")
    parser.add_argument("--quick", action="store_true", help="a few batches of 16 (smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    batch_size, batches = (16, 3) if args.quick else (args.batch_size, args.batches)
    result = run(args.images, args.workers, batch_size, batches, Path(args.root))
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
