"""Deterministic, resumable order of training samples.

Training length is counted in samples seen. Every sample has a key ``(item, seed)``: the
dataset item to read and a 63-bit seed from which all of that sample's randomness (crop
position, noise, timestep, label dropout) is derived. The key of the ``n``-th sample of a
run depends only on the run seed and ``n``, so

* resuming at ``n`` continues the same stream (no sampler state besides ``n``);
* the same samples are seen for any number of DataLoader workers or processes: process
  ``r`` of ``world`` takes every ``world``-th micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

SampleKey = tuple[int, int]


def derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (``numpy.random.SeedSequence``)."""
    words = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2)
    return int((int(words[0]) << 31) ^ int(words[1])) & 0x7FFFFFFFFFFFFFFF


class ShuffledOrder:
    """Every item once per epoch, in a fresh permutation per epoch.

    Micro-batch ``u`` holds the flat positions ``[u * batch_size, (u + 1) * batch_size)`` of
    the concatenated epoch permutations, so epochs run into each other without a short
    last batch.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int):
        if num_items < 1:
            raise ValueError("cannot train on 0 items; check the store's train split")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self._cached_epoch = -1
        self._cached_permutation = np.arange(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._cached_epoch:
            rng = np.random.default_rng(derive_seed(self.seed, epoch, 0x5EED))
            self._cached_permutation = rng.permutation(self.num_items)
            self._cached_epoch = epoch
        return self._cached_permutation

    def micro_batch(self, index: int) -> list[SampleKey]:
        """Return the keys of global micro-batch ``index``."""
        keys = []
        for position in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, offset = divmod(position, self.num_items)
            item = int(self._permutation(epoch)[offset])
            keys.append((item, derive_seed(self.seed, position)))
        return keys


@dataclass
class RankBatchSampler:
    """Batch sampler of one process: micro-batches ``u = (step * accum + m) * world + rank``.

    Infinite; starts at optimizer step ``start_step``. Use as ``DataLoader(batch_sampler=...)``.
    """

    order: ShuffledOrder
    start_step: int
    grad_accum: int
    world_size: int
    rank: int

    def __iter__(self) -> Iterator[list[SampleKey]]:
        step = self.start_step
        while True:
            for micro in range(self.grad_accum):
                index = (step * self.grad_accum + micro) * self.world_size + self.rank
                yield self.order.micro_batch(index)
            step += 1
