"""Streamed CLOC training data: WebDataset tar shards (:mod:`cloc_encoder.data.shards`) → batches of the same size
on every rank, with memory that does not grow with the data set and a resume at shard granularity.

The plan of epoch ``e`` is a pure function of ``(seed, e, world size)``:

- the shard list is permuted with ``(seed, e)``; rank ``r`` of ``W`` takes shards ``r, r+W, r+2W, ...`` of that
  order (``webdataset.split_by_node``'s rule on an order that changes every epoch), so ranks read disjoint shards;
- DataLoader worker ``k`` of ``K`` reads every ``K``-th of the rank's shards (``webdataset.split_by_worker``),
  shuffles the raw samples in a buffer of ``shuffle_buffer`` samples (``webdataset.shuffle``, seeded with
  ``(seed, e, r, k)``) and decodes them (image + record → :class:`~train.cloc.data.RegionTextEncoder`);
- the main process takes the workers' samples in turn, cuts them into batches of ``batch_size`` and ends the epoch
  after :attr:`ShardPlan.batches_per_epoch` batches: the samples of the ``⌊N/W⌋`` smallest shards divided by the
  batch size, which every rank reaches in every epoch. All ranks thus run the same number of steps with the same
  batch size (the contrastive losses gather across ranks); what a rank's shards hold beyond that is not used in
  that epoch (with equal shards, a shard count divisible by ``W`` and shard sizes divisible by the batch size,
  nothing is dropped and every sample is seen once per epoch).

Unreadable samples (bad image bytes, missing or malformed JSON) are skipped and reported in
:attr:`~train.cloc.data.CLOCBatch.skipped` like the JSONL data set's unreadable images; more than
``SKIP_ALLOWANCE + max_skipped_fraction · samples`` skips on a rank stop the run with :class:`TooManySkipsError`.
A shard that cannot be opened or is truncated is logged and left (the epoch is filled by reading the rank's shards
again if it runs short). If an epoch's shards run out before the epoch's batches are full (skips, short shards),
they are read again from the start, with a warning.

Resume (:meth:`StreamingBatches.state_dict`, saved per rank in the checkpoint): the epoch, the batches done in it
and the shards *finished* in it (every sample of the shard went into a trained batch or was skipped). A resumed
epoch reads only its unfinished shards, so nothing is read twice except the shards that were open when the
checkpoint was written (at most about ``num_workers + shuffle_buffer / shard size`` per rank): their samples that
had already been trained on are trained on again; none is skipped. The resumed epoch's order differs from the
uninterrupted run's; every later epoch is identical to it.
"""

from __future__ import annotations

import io
import logging
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cloc_encoder.data.format import RecordError, RegionTextRecord
from cloc_encoder.data.images import IMAGE_ERRORS
from cloc_encoder.data.shards import (
    SIZES_FILE,
    decode_sample,
    default_sizes_location,
    expand_shards,
    log_and_continue,
    read_sizes,
    shard_name,
)

logger = logging.getLogger(__name__)

SKIP_ALLOWANCE = 10
"""Skips a rank tolerates before :data:`max_skipped_fraction` applies (a few bad samples in the first shard)."""
SHARD_KEY = "__shard__"
SKIP_KEY = "__skip__"


class TooManySkipsError(RuntimeError):
    """More samples were unreadable than the run allows: the data (or its path) is broken."""


@dataclass(frozen=True)
class ShardPlan:
    """Which shards each rank reads in each epoch, and how many batches an epoch has.

    Args:
        urls: every shard's URL (local path, ``http(s)://``, ``pipe:...``).
        sizes: samples per shard, in ``urls`` order.
    """

    urls: tuple[str, ...]
    sizes: tuple[int, ...]
    batch_size: int
    world_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.urls) < self.world_size:
            raise ValueError(
                f"{len(self.urls)} shards cannot feed {self.world_size} ranks: write at least one shard per rank "
                "(a smaller --samples-per-shard)"
            )
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"every rank must read at least one batch per epoch: the {len(self.urls) // self.world_size} "
                f"smallest shards hold {self.guaranteed_samples} samples, fewer than batch_size {self.batch_size}"
            )

    @property
    def guaranteed_samples(self) -> int:
        """Samples every rank holds in every epoch: the ``⌊N/W⌋`` smallest shards."""
        return sum(sorted(self.sizes)[: len(self.urls) // self.world_size])

    @property
    def batches_per_epoch(self) -> int:
        return self.guaranteed_samples // self.batch_size

    def epoch_order(self, epoch: int) -> list[int]:
        """Shard indices of ``epoch`` in reading order (a permutation drawn from ``(seed, epoch)``)."""
        return np.random.default_rng([self.seed, epoch, 0x5A4D]).permutation(len(self.urls)).tolist()

    def rank_shards(self, epoch: int, rank: int) -> list[str]:
        """The URLs rank ``rank`` reads in ``epoch`` (disjoint across ranks, their union is every shard)."""
        return [self.urls[i] for i in self.epoch_order(epoch)[rank :: self.world_size]]


class EpochShards(IterableDataset):
    """One rank's samples of one epoch, read by DataLoader workers (each takes every ``K``-th shard).

    Yields model-ready samples (:class:`RegionTextEncoder`) with ``__shard__`` (the shard's name), or
    ``{"__skip__": reason, "__shard__": name}`` for a sample that could not be used.
    """

    def __init__(
        self,
        shards: Sequence[str],
        encoder: Callable[[RegionTextRecord, Image.Image, np.random.Generator], dict[str, Any]],
        *,
        epoch: int,
        rank: int,
        seed: int,
        shuffle_buffer: int,
    ) -> None:
        self.shards = list(shards)
        self.encoder = encoder
        self.epoch, self.rank, self.seed = epoch, rank, seed
        self.shuffle_buffer = shuffle_buffer

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        name = shard_name(sample.get("__url__", "?.tar"))
        try:
            record, data = decode_sample(sample)
        except RecordError as error:
            return {SKIP_KEY: str(error), SHARD_KEY: name}
        try:
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                image = opened.convert("RGB")
        except IMAGE_ERRORS as error:
            return {
                SKIP_KEY: f"{record.id} ({name}#{sample['__key__']}): {type(error).__name__}: {error}",
                SHARD_KEY: name,
            }
        rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(record.id.encode("utf-8"))])
        encoded = self.encoder(record, image, rng)
        encoded[SHARD_KEY] = name
        return encoded

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.shards:
            return
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stages: list[Any] = [
            wds.SimpleShardList(self.shards),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=log_and_continue),
        ]
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng))
        stages.append(wds.map(self.decode))
        yield from wds.DataPipeline(*stages)


class StreamingBatches:
    """Endless batches of one rank from tar shards (see the module docstring for the plan and the resume rule).

    The training loop places them in epochs with :meth:`locate` and :attr:`batches_per_epoch`, and sets
    :attr:`start` (batches already trained) before iterating, as for a :class:`~train.samplers.ResumableBatchSampler`.
    """

    def __init__(
        self,
        plan: ShardPlan,
        encoder: Callable[[RegionTextRecord, Image.Image, np.random.Generator], dict[str, Any]],
        collate: Callable[[Sequence[dict[str, Any]]], Any],
        *,
        rank: int = 0,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        max_skipped_fraction: float = 0.01,
    ) -> None:
        if not 0 <= rank < plan.world_size:
            raise ValueError(f"rank {rank} is outside world_size {plan.world_size}")
        self.plan, self.encoder, self.collate = plan, encoder, collate
        self.rank, self.num_workers, self.shuffle_buffer = rank, num_workers, shuffle_buffer
        self.max_skipped_fraction = max_skipped_fraction
        self.batch_size = plan.batch_size
        self.batches_per_epoch = plan.batches_per_epoch
        self.start = 0
        self.epoch, self.position = 0, 0
        self.finished: set[str] = set()
        self.consumed: Counter[str] = Counter()
        self.samples_seen, self.samples_skipped = 0, 0
        self._resume: dict[str, Any] | None = None
        self._sizes = {shard_name(url): size for url, size in zip(plan.urls, plan.sizes, strict=True)}

    def locate(self, batch_number: int) -> tuple[int, int]:
        """``(epoch, position)`` of the ``batch_number``-th batch since the start of training."""
        return divmod(batch_number, self.batches_per_epoch)

    # ----- resume -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's position at shard granularity (JSON-ready): the epoch, its batches done, its finished shards."""
        epoch, position, finished = self.epoch, self.position, sorted(self.finished)
        if position >= self.batches_per_epoch:
            epoch, position, finished = epoch + 1, 0, []
        return {
            "epoch": epoch,
            "position": position,
            "finished_shards": finished,
            "rank": self.rank,
            "world_size": self.plan.world_size,
            "batch_size": self.batch_size,
            "seed": self.plan.seed,
            "num_shards": len(self.plan.urls),
            "samples_seen": self.samples_seen,
            "samples_skipped": self.samples_skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of the same rank (applied when iteration starts at its position)."""
        same = {
            "rank": self.rank,
            "world_size": self.plan.world_size,
            "batch_size": self.batch_size,
            "seed": self.plan.seed,
            "num_shards": len(self.plan.urls),
        }
        changed = [key for key, value in same.items() if state.get(key) != value]
        if changed:
            logger.warning("data state of another plan (%s differ): the resumed epoch reads all its shards", changed)
            return
        self._resume = state

    def _begin(self) -> None:
        self.epoch, self.position = self.locate(self.start)
        resume, self._resume = self._resume, None
        self.finished, self.consumed = set(), Counter()
        if resume is None:
            return
        if (resume["epoch"], resume["position"]) != (self.epoch, self.position):
            logger.warning(
                "data state is at epoch %d batch %d but training resumes at epoch %d batch %d: reading all shards",
                resume["epoch"], resume["position"], self.epoch, self.position,
            )  # fmt: skip
            return
        self.finished = set(resume["finished_shards"])
        self.samples_seen, self.samples_skipped = resume["samples_seen"], resume["samples_skipped"]
        logger.info(
            "rank %d resumes epoch %d at batch %d/%d; %d finished shards are not read again",
            self.rank, self.epoch, self.position, self.batches_per_epoch, len(self.finished),
        )  # fmt: skip

    # ----- iteration --------------------------------------------------------------------------------------------

    def _samples(self, shards: Sequence[str]) -> Iterator[dict[str, Any]]:
        dataset = EpochShards(
            shards, self.encoder, epoch=self.epoch, rank=self.rank, seed=self.plan.seed,
            shuffle_buffer=self.shuffle_buffer,
        )  # fmt: skip
        loader = DataLoader(dataset, batch_size=None, num_workers=min(self.num_workers, max(1, len(shards))))
        return iter(loader)

    def _count_skip(self, reason: str) -> None:
        self.samples_skipped += 1
        limit = SKIP_ALLOWANCE + self.max_skipped_fraction * self.samples_seen
        if self.samples_skipped > limit:
            raise TooManySkipsError(
                f"rank {self.rank}: {self.samples_skipped} of {self.samples_seen} samples could not be used (last: "
                f"{reason}), more than {SKIP_ALLOWANCE} + max_skipped_fraction {self.max_skipped_fraction:g} allows: "
                "check the shards (python -m cloc_encoder.data.shards writes them) or raise max_skipped_fraction"
            )

    def _epoch_batches(self) -> Iterator[Any]:
        shards = self.plan.rank_shards(self.epoch, self.rank)
        todo = [url for url in shards if shard_name(url) not in self.finished]
        while self.position < self.batches_per_epoch:
            batch: list[dict[str, Any]] = []
            pending: list[str] = []
            used = 0
            for item in self._samples(todo):
                self.samples_seen += 1
                if SKIP_KEY in item:
                    pending.append(item[SKIP_KEY])
                    self.consumed[item[SHARD_KEY]] += 1
                    self._count_skip(item[SKIP_KEY])
                    continue
                item["skipped"], pending = pending, []
                batch.append(item)
                used += 1
                if len(batch) < self.batch_size:
                    continue
                for sample in batch:
                    self.consumed[sample.pop(SHARD_KEY)] += 1
                self.finished.update(n for n, c in self.consumed.items() if c >= self._sizes.get(n, c + 1))
                self.position += 1
                yield self.collate(batch)
                batch = []
                if self.position >= self.batches_per_epoch:
                    return
            if used == 0:
                raise RuntimeError(
                    f"rank {self.rank}: the shards of epoch {self.epoch} gave no usable sample: {todo[:3]}"
                )
            logger.warning(
                "rank %d: epoch %d's shards ran out at batch %d of %d (skipped or short shards); reading them again",
                self.rank, self.epoch, self.position, self.batches_per_epoch,
            )  # fmt: skip
            todo = shards

    def __iter__(self) -> Iterator[Any]:
        self._begin()
        while True:
            yield from self._epoch_batches()
            self.epoch, self.position = self.epoch + 1, 0
            self.finished, self.consumed = set(), Counter()


def shard_plan(spec: str, sizes_location: str | None, *, batch_size: int, world_size: int, seed: int) -> ShardPlan:
    """The plan of shards ``spec`` (brace pattern, ``::`` list, URLs) with sample counts from ``sizes_location``
    (``sizes.json``: a path or any WebDataset URL; default: beside local shards). Raises :class:`ValueError` or
    :class:`FileNotFoundError` with what to do."""
    urls = expand_shards(spec)
    location = sizes_location or default_sizes_location(urls)
    if location is None:
        raise ValueError(
            f"train_data={spec!r} is remote: give train_shard_sizes=<URL or path of its {SIZES_FILE}> "
            "(written beside the shards by python -m cloc_encoder.data.shards and by VESL)"
        )
    try:
        sizes = read_sizes(location)
    except OSError as error:
        raise FileNotFoundError(f"train_shard_sizes: cannot read {location}: {error}") from error
    missing = [shard_name(url) for url in urls if shard_name(url) not in sizes]
    if missing:
        raise ValueError(f"{location} has no sample count for {len(missing)} shards, e.g. {missing[:3]}")
    counts = tuple(sizes[shard_name(url)] for url in urls)
    return ShardPlan(tuple(urls), counts, batch_size=batch_size, world_size=world_size, seed=seed)


__all__ = [
    "SKIP_ALLOWANCE",
    "EpochShards",
    "ShardPlan",
    "StreamingBatches",
    "TooManySkipsError",
    "shard_plan",
]
