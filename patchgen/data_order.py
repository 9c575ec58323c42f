"""Deterministic, resumable order of training samples.

Training length is counted in samples seen. Every sample has a key ``(item, seed)``: the
dataset item to read and a 63-bit seed from which all of that sample's randomness (crop
position, noise, timestep, label dropout) is derived. The keys of micro-batch ``u`` depend
only on the run seed and ``u``, so

* resuming at micro-batch ``u`` continues the same stream (no sampler state besides ``u``);
* the same samples are seen for any number of DataLoader workers or processes: process
  ``r`` of ``world`` takes every ``world``-th micro-batch.

Two orders implement ``micro_batch(u)``:

* ``ShuffledOrder``: every item once per epoch, one permutation per epoch;
* ``BucketOrder``: items grouped by aspect-ratio bucket. All items of a micro-batch share
  a bucket (and so a canvas shape), and every item of a bucket is seen once per pass over
  that bucket. ``plan_buckets`` assigns items to buckets and merges buckets that are too
  small to fill a micro-batch.

The seed of sample ``i`` of micro-batch ``u`` is ``derive_seed(run_seed, u * B + i)`` in
both orders.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)

SampleKey = tuple[int, int]
Shape = tuple[int, int]

# Stream ids that keep the permutations of different purposes independent.
_EPOCH_STREAM = 0x5EED
_BUCKET_PASS_STREAM = 0xB0C4
_BUCKET_SCHEDULE_STREAM = 0x5C4E


def derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (``numpy.random.SeedSequence``)."""
    words = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2)
    return int((int(words[0]) << 31) ^ int(words[1])) & 0x7FFFFFFFFFFFFFFF


class SampleOrder(Protocol):
    """An infinite, randomly addressable stream of micro-batches of sample keys."""

    batch_size: int

    def micro_batch(self, index: int) -> list[SampleKey]: ...


def _sample_seeds(seed: int, index: int, batch_size: int) -> list[int]:
    """Key seeds of the samples of micro-batch ``index``."""
    return [derive_seed(seed, position)
            for position in range(index * batch_size, (index + 1) * batch_size)]


class ShuffledOrder:
    """Every item once per epoch, in a fresh permutation per epoch.

    Micro-batch ``u`` contains the flat positions ``[u * batch_size, (u + 1) * batch_size)`` of
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
            rng = np.random.default_rng(derive_seed(self.seed, epoch, _EPOCH_STREAM))
            self._cached_permutation = rng.permutation(self.num_items)
            self._cached_epoch = epoch
        return self._cached_permutation

    def micro_batch(self, index: int) -> list[SampleKey]:
        """Return the keys of global micro-batch ``index``."""
        seeds = _sample_seeds(self.seed, index, self.batch_size)
        keys = []
        for offset_in_batch, position in enumerate(range(index * self.batch_size,
                                                         (index + 1) * self.batch_size)):
            epoch, offset = divmod(position, self.num_items)
            keys.append((int(self._permutation(epoch)[offset]), seeds[offset_in_batch]))
        return keys


# --- aspect-ratio buckets ------------------------------------------------------------------
def _log_aspect(shape: Shape) -> float:
    return math.log(shape[0] / shape[1])


def nearest_bucket(shape: Shape, buckets: Sequence[Shape], candidates: Sequence[int]) -> int:
    """Index (into ``buckets``) of the candidate whose aspect ratio H/W is closest to ``shape``'s.

    Distance is measured between log aspect ratios; ties go to the first candidate.
    """
    target = _log_aspect(shape)
    return min(candidates, key=lambda b: abs(_log_aspect(buckets[b]) - target))


@dataclass(frozen=True)
class BucketPlan:
    """Assignment of items to declared buckets after small buckets were merged away.

    ``bucket_of_item[i]`` indexes ``shapes`` and ``active`` lists the buckets that kept
    items. Every item sits in the active bucket nearest to its aspect ratio, the same rule
    that ``nearest_bucket(shape, shapes, active)`` applies to new sizes at sampling.
    """

    shapes: tuple[Shape, ...]
    bucket_of_item: tuple[int, ...]
    active: tuple[int, ...]

    def counts(self) -> dict[Shape, int]:
        """Number of items per active bucket shape."""
        found = np.bincount(np.asarray(self.bucket_of_item), minlength=len(self.shapes))
        return {self.shapes[b]: int(found[b]) for b in self.active}

    def shape_of_item(self, item: int) -> Shape:
        return self.shapes[self.bucket_of_item[item]]


def plan_buckets(item_shapes: Sequence[Shape], buckets: Sequence[Shape],
                 batch_size: int) -> BucketPlan:
    """Assign every item to its nearest bucket by aspect ratio; merge buckets too small to batch.

    A bucket with fewer than ``batch_size`` items (but more than none) is dropped from the
    active set, and its items go to their nearest remaining bucket. The smallest such
    bucket goes first, until every active bucket can fill a micro-batch or one bucket is
    left. No item is ever dropped, and each merge is logged as a warning.

    Args:
        item_shapes: native (H, W) of every item.
        buckets: declared canvas shapes (H, W).
        batch_size: samples per micro-batch.
    """
    if not item_shapes:
        raise ValueError("cannot plan buckets for 0 items; check the store's train split")
    shapes = tuple((int(h), int(w)) for h, w in buckets)
    active = list(range(len(shapes)))
    while True:
        assignment = [nearest_bucket(shape, shapes, active) for shape in item_shapes]
        counts = np.bincount(np.asarray(assignment), minlength=len(shapes))
        empty = [b for b in active if counts[b] == 0]
        active = [b for b in active if counts[b] > 0]
        if empty:
            log.info("buckets without images: %s", [shapes[b] for b in empty])
        small = [b for b in active if counts[b] < batch_size]
        if not small or len(active) == 1:
            break
        merged = min(small, key=lambda b: (counts[b], b))
        active.remove(merged)
        log.warning("bucket %dx%d has %d images, fewer than batch_size %d; its images move to "
                    "the nearest remaining buckets", *shapes[merged], counts[merged], batch_size)
    if counts[active[0]] < batch_size and len(active) == 1:
        log.warning("only %d images for batch_size %d: micro-batches repeat images",
                    int(counts[active[0]]), batch_size)
    return BucketPlan(shapes=shapes, bucket_of_item=tuple(int(b) for b in assignment),
                      active=tuple(active))


class BucketOrder:
    """Micro-batches that each come from one bucket, in proportion to the bucket sizes.

    Each active bucket ``b`` with ``n_b`` items has its own stream: the concatenation of
    one permutation of its items per pass. Global epoch ``e`` contains
    ``floor((e + 1) n_b / B) - floor(e n_b / B)`` micro-batches of bucket ``b``, shuffled
    among the buckets; the ``k``-th micro-batch of bucket ``b`` takes stream positions
    ``[k B, (k + 1) B)``. So every item of a bucket is seen once per pass over the bucket,
    a global epoch holds about one pass of every bucket, and when ``n_b`` is not a
    multiple of ``B`` one micro-batch spans the end of a pass and the start of the next.
    """

    def __init__(self, plan: BucketPlan, batch_size: int, seed: int):
        self.plan = plan
        self.batch_size = batch_size
        self.seed = seed
        groups = np.asarray(plan.bucket_of_item)
        self.buckets = list(plan.active)
        self.items = {b: np.flatnonzero(groups == b) for b in self.buckets}
        self.num_items = len(groups)
        self._schedule_epoch = -1
        self._schedule: tuple[np.ndarray, np.ndarray] = (np.arange(0), np.arange(0))
        self._passes: dict[int, tuple[int, np.ndarray]] = {}

    def _batches_before(self, epoch: int) -> dict[int, int]:
        """Micro-batches of each bucket in global epochs ``0 .. epoch - 1``."""
        return {b: epoch * len(self.items[b]) // self.batch_size for b in self.buckets}

    def _epoch_start(self, epoch: int) -> int:
        return sum(self._batches_before(epoch).values())

    def _epoch_of(self, index: int) -> int:
        """Global epoch whose micro-batches include ``index``."""
        epoch = index * self.batch_size // self.num_items
        while self._epoch_start(epoch + 1) <= index:
            epoch += 1
        while self._epoch_start(epoch) > index:
            epoch -= 1
        return epoch

    def _epoch_schedule(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Bucket of each micro-batch of ``epoch`` and its index in that bucket's stream."""
        if epoch != self._schedule_epoch:
            before = self._batches_before(epoch)
            after = self._batches_before(epoch + 1)
            labels = np.concatenate([np.full(after[b] - before[b], b) for b in self.buckets])
            rng = np.random.default_rng(derive_seed(self.seed, epoch, _BUCKET_SCHEDULE_STREAM))
            labels = rng.permutation(labels)
            stream_index = np.empty(len(labels), dtype=np.int64)
            seen = dict(before)
            for j, b in enumerate(labels.tolist()):
                stream_index[j] = seen[b]
                seen[b] += 1
            self._schedule = (labels, stream_index)
            self._schedule_epoch = epoch
        return self._schedule

    def _pass_permutation(self, bucket: int, pass_index: int) -> np.ndarray:
        cached = self._passes.get(bucket)
        if cached is None or cached[0] != pass_index:
            rng = np.random.default_rng(
                derive_seed(self.seed, bucket, pass_index, _BUCKET_PASS_STREAM))
            cached = (pass_index, self.items[bucket][rng.permutation(len(self.items[bucket]))])
            self._passes[bucket] = cached
        return cached[1]

    def bucket_of(self, index: int) -> int:
        """Declared bucket index of micro-batch ``index``."""
        epoch = self._epoch_of(index)
        labels, _ = self._epoch_schedule(epoch)
        return int(labels[index - self._epoch_start(epoch)])

    def micro_batch(self, index: int) -> list[SampleKey]:
        """Return the keys of global micro-batch ``index`` (all from one bucket)."""
        epoch = self._epoch_of(index)
        labels, stream_index = self._epoch_schedule(epoch)
        j = index - self._epoch_start(epoch)
        bucket, k = int(labels[j]), int(stream_index[j])
        size = len(self.items[bucket])
        seeds = _sample_seeds(self.seed, index, self.batch_size)
        keys = []
        for i, position in enumerate(range(k * self.batch_size, (k + 1) * self.batch_size)):
            pass_index, offset = divmod(position, size)
            keys.append((int(self._pass_permutation(bucket, pass_index)[offset]), seeds[i]))
        return keys


@dataclass
class RankBatchSampler:
    """Batch sampler of one process: micro-batches ``u = (step * accum + m) * world + rank``.

    Infinite; starts at optimizer step ``start_step``. Use as ``DataLoader(batch_sampler=...)``.
    """

    order: SampleOrder
    start_step: int
    grad_accum: int
    world_size: int
    rank: int

    def __iter__(self) -> Iterator[list[SampleKey]]:
        step = self.start_step
        while True:
            for micro in range(self.grad_accum):
                yield self.order.micro_batch(micro_batch_index(step, micro, self.grad_accum,
                                                               self.world_size, self.rank))
            step += 1


def micro_batch_index(step: int, micro: int, grad_accum: int, world_size: int, rank: int) -> int:
    """Global index of micro-batch ``micro`` of optimizer step ``step`` on process ``rank``."""
    return (step * grad_accum + micro) * world_size + rank
