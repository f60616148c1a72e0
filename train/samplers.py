"""Batch samplers shared by the trainers: endless, resumable, rank-sharded streams of ``(epoch, index)`` keys
for training, and one sharded pass for validation.

Every batch is a pure function of ``(seed, batch number)``, so a resumed run (``start=``) sees exactly the batches
the uninterrupted run would have seen, on any number of data-loader workers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from torch.utils.data import Sampler

SampleKey = tuple[int, int]
"""``(epoch, index)``: what the sampler hands the dataset, so sampling is reproducible in any worker."""


class BatchSchedule(Protocol):
    """Where the training loop's batches fall in epochs: what it needs of a sampler or a batch stream.
    ``start`` (batches already trained) is set before iteration begins."""

    start: int
    batches_per_epoch: int

    def locate(self, batch_number: int) -> tuple[int, int]:
        """``(epoch, position)`` of the ``batch_number``-th batch since the start of training."""
        ...


class ResumableBatchSampler(Sampler[list[SampleKey]]):
    """Endless stream of this rank's batches of ``(epoch, index)`` keys, reproducible from ``(seed, epoch, position)``.

    Epoch ``e`` is a permutation of the data set drawn from ``(seed, e)`` (or data set order when not
    ``shuffle``), cut into global batches of ``batch_size · world_size`` samples (the incomplete tail is dropped so
    every rank's batch has the same size); rank ``r`` takes the ``r``-th slice of each global batch. Batch
    ``position`` of epoch ``e`` is therefore the same on every run, and iteration can start anywhere.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        start: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.start = start
        self.batches_per_epoch = num_samples // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the data set has {num_samples} samples, fewer than one global batch "
                f"(batch_size {batch_size} x world_size {world_size})"
            )

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The data set indices of ``epoch`` in visiting order."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch, 0xC10C]).permutation(self.num_samples)

    def locate(self, batch_number: int) -> tuple[int, int]:
        """``(epoch, position)`` of the ``batch_number``-th batch since the start of training."""
        return divmod(batch_number, self.batches_per_epoch)

    def batch(self, epoch: int, position: int) -> list[SampleKey]:
        """This rank's keys of batch ``position`` of ``epoch``."""
        begin = (position * self.world_size + self.rank) * self.batch_size
        indices = self.epoch_order(epoch)[begin : begin + self.batch_size]
        return [(epoch, int(i)) for i in indices]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        number = self.start
        while True:
            yield self.batch(*self.locate(number))
            number += 1


class EvalBatchSampler(Sampler[list[SampleKey]]):
    """One pass over the data set in order, sharded by rank; at most ``max_batches`` batches.

    With several ranks the incomplete tail is dropped (equal batch sizes for the cross-rank gathers); a single
    process keeps it.
    """

    def __init__(
        self, num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1, max_batches: int | None = None
    ) -> None:
        global_batch = batch_size * world_size
        full, tail = divmod(num_samples, global_batch)
        count = full + (1 if tail and world_size == 1 else 0)
        self.num_batches = count if max_batches is None else min(count, max_batches)
        self.batch_size, self.rank, self.world_size, self.num_samples = batch_size, rank, world_size, num_samples

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for number in range(self.num_batches):
            begin = (number * self.world_size + self.rank) * self.batch_size
            yield [(0, i) for i in range(begin, min(begin + self.batch_size, self.num_samples))]


class LengthGroupedBatchSampler(ResumableBatchSampler):
    """:class:`ResumableBatchSampler` whose epochs put samples of similar length together.

    Epoch ``e``: a permutation drawn from ``(seed, e)`` is cut into mega-batches of ``megabatch_batches`` global
    batches; each mega-batch is sorted by length (longest first); the global batches are then visited in an order
    drawn from ``(seed, e)`` as well (as transformers' ``LengthGroupedSampler``, with a random instead of
    longest-first batch order). Everything is a pure function of ``(seed, epoch)``, so resuming at a batch number
    reproduces the stream, and each rank's slice of a global batch holds similar lengths (little padding).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        megabatch_batches: int = 50,
        **kwargs: Any,
    ) -> None:
        super().__init__(len(lengths), batch_size, **kwargs)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.megabatch_batches = max(1, megabatch_batches)
        self._cached: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        order = super().epoch_order(epoch)
        global_batch = self.batch_size * self.world_size
        usable = order[: self.batches_per_epoch * global_batch]
        mega = global_batch * self.megabatch_batches
        grouped = []
        for start in range(0, len(usable), mega):
            chunk = usable[start : start + mega]
            grouped.append(chunk[np.argsort(-self.lengths[chunk], kind="stable")])
        batches = np.concatenate(grouped).reshape(self.batches_per_epoch, global_batch)
        visit = np.random.default_rng([self.seed, epoch, 0x1E46]).permutation(self.batches_per_epoch)
        result = np.concatenate([batches[visit].reshape(-1), order[len(usable) :]])
        self._cached = (epoch, result)
        return result


__all__ = ["BatchSchedule", "EvalBatchSampler", "LengthGroupedBatchSampler", "ResumableBatchSampler", "SampleKey"]
