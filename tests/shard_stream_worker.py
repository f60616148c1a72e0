"""One rank of the 2-process streaming test (tests/test_cloc_shards.py), launched by ``run_two_ranks``.

``python -m tests.shard_stream_worker SHARDS BATCH_SIZE OUT``: one epoch of this rank's
:class:`~train.cloc.streaming.StreamingBatches` (2 DataLoader workers, ids only), gathered over gloo; rank 0 writes
``{"plan": ..., "ranks": [{"rank", "shards", "batches": [[id, ...], ...]}, ...]}`` to ``OUT``.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist

from cloc_encoder.distributed import init_distributed
from train.cloc.streaming import StreamingBatches, shard_plan


def ids_encoder(record: Any, image: Any, rng: Any) -> dict[str, Any]:
    """A stand-in for RegionTextEncoder: only the record id (the test checks which samples a rank saw)."""
    return {"id": record.id}


def ids_collate(samples: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    return {"ids": [s["id"] for s in samples], "skipped": [m for s in samples for m in s["skipped"]]}


def main(argv: Sequence[str]) -> int:
    shards, batch_size, out = argv[0], int(argv[1]), argv[2]
    context = init_distributed("cpu")
    plan = shard_plan(shards, None, batch_size=batch_size, world_size=context.world_size, seed=0)
    stream = StreamingBatches(plan, ids_encoder, ids_collate, rank=context.rank, num_workers=2, shuffle_buffer=4)
    batches = [b["ids"] for b in itertools.islice(iter(stream), plan.batches_per_epoch)]
    mine = {"rank": context.rank, "shards": plan.rank_shards(0, context.rank), "batches": batches}
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, mine)
    if context.is_main:
        with open(out, "w", encoding="utf-8") as handle:
            json.dump({"batches_per_epoch": plan.batches_per_epoch, "ranks": gathered}, handle)
    context.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
