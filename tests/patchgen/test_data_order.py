"""Sample orders: determinism, coverage per epoch, aspect-ratio buckets and rank partitioning."""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from patchgen.data_order import (BucketOrder, RankBatchSampler, ShuffledOrder, derive_seed,
                                 micro_batch_index, nearest_bucket, plan_buckets)

BUCKETS = [(64, 64), (56, 72), (72, 56), (48, 80), (80, 48)]
PORTRAIT, LANDSCAPE, SQUARE, WIDE = (454, 373), (373, 454), (500, 500), (300, 520)


def _items(order, indices):
    return [item for index in indices for item, _ in order.micro_batch(index)]


def test_shuffled_covers_each_item_per_epoch():
    order = ShuffledOrder(num_items=10, batch_size=5, seed=3)
    first, second = _items(order, range(2)), _items(order, range(2, 4))
    assert sorted(first) == list(range(10))
    assert sorted(second) == list(range(10))
    assert first != second


def test_shuffled_random_access_matches_sequence():
    sequential = ShuffledOrder(num_items=7, batch_size=3, seed=1)
    keys = [sequential.micro_batch(u) for u in range(12)]
    fresh = ShuffledOrder(num_items=7, batch_size=3, seed=1)
    assert fresh.micro_batch(11) == keys[11]
    assert fresh.micro_batch(4) == keys[4]


def test_sample_seeds_unique_and_seeded():
    order = ShuffledOrder(num_items=4, batch_size=4, seed=0)
    seeds = [seed for u in range(50) for _, seed in order.micro_batch(u)]
    assert len(set(seeds)) == len(seeds)
    assert seeds[0] == derive_seed(0, 0)
    other = ShuffledOrder(num_items=4, batch_size=4, seed=1)
    assert other.micro_batch(0) != order.micro_batch(0)


def test_nearest_bucket_by_aspect():
    assert BUCKETS[nearest_bucket(PORTRAIT, BUCKETS, range(5))] == (72, 56)
    assert BUCKETS[nearest_bucket(LANDSCAPE, BUCKETS, range(5))] == (56, 72)
    assert BUCKETS[nearest_bucket(SQUARE, BUCKETS, range(5))] == (64, 64)
    assert BUCKETS[nearest_bucket(WIDE, BUCKETS, range(5))] == (48, 80)


def test_plan_keeps_full_buckets():
    shapes = [PORTRAIT] * 4 + [LANDSCAPE] * 6
    plan = plan_buckets(shapes, BUCKETS, batch_size=4)
    assert plan.counts() == {(56, 72): 6, (72, 56): 4}
    assert [plan.shape_of_item(i) for i in (0, 9)] == [(72, 56), (56, 72)]


def test_plan_merges_small_bucket(caplog):
    shapes = [PORTRAIT] * 5 + [LANDSCAPE] * 6 + [WIDE] * 2
    with caplog.at_level(logging.WARNING, logger="patchgen.data_order"):
        plan = plan_buckets(shapes, BUCKETS, batch_size=4)
    assert plan.counts() == {(56, 72): 8, (72, 56): 5}
    assert [plan.shape_of_item(i) for i in (11, 12)] == [(56, 72), (56, 72)]
    assert sum(plan.counts().values()) == len(shapes)
    assert "48x80 has 2 images" in caplog.text


def test_plan_merges_down_to_one_bucket():
    shapes = [PORTRAIT] * 2 + [LANDSCAPE] * 3
    plan = plan_buckets(shapes, BUCKETS, batch_size=8)
    assert len(plan.active) == 1
    assert sum(plan.counts().values()) == 5


def test_plan_rejects_no_items():
    with pytest.raises(ValueError, match="0 items"):
        plan_buckets([], BUCKETS, batch_size=2)


def _bucket_order(counts: dict[tuple[int, int], int], batch_size: int, seed: int = 0):
    native = {(72, 56): PORTRAIT, (56, 72): LANDSCAPE, (64, 64): SQUARE, (48, 80): WIDE}
    shapes = [native[bucket] for bucket, n in counts.items() for _ in range(n)]
    plan = plan_buckets(shapes, BUCKETS, batch_size)
    return plan, BucketOrder(plan, batch_size, seed)


def test_bucket_order_yields_declared_shapes():
    plan, order = _bucket_order({(72, 56): 7, (56, 72): 9, (64, 64): 5}, batch_size=4)
    for index in range(60):
        shapes = {plan.shape_of_item(item) for item, _ in order.micro_batch(index)}
        assert len(shapes) == 1
        assert shapes <= set(BUCKETS)
        assert shapes == {BUCKETS[order.bucket_of(index)]}


def test_bucket_order_covers_each_item_once_per_epoch():
    plan, order = _bucket_order({(72, 56): 8, (56, 72): 12, (64, 64): 4}, batch_size=4)
    batches_per_epoch = 24 // 4
    for epoch in range(3):
        items = _items(order, range(epoch * batches_per_epoch, (epoch + 1) * batches_per_epoch))
        assert sorted(items) == list(range(24))


def test_bucket_order_each_pass_is_permutation():
    plan, order = _bucket_order({(72, 56): 7, (56, 72): 10}, batch_size=4)
    streams: dict[int, list[int]] = {}
    for index in range(40):
        streams.setdefault(order.bucket_of(index), []).extend(
            item for item, _ in order.micro_batch(index))
    for bucket, stream in streams.items():
        members = sorted(order.items[bucket].tolist())
        size = len(members)
        for start in range(0, len(stream) - size + 1, size):
            assert sorted(stream[start:start + size]) == members


def test_bucket_order_proportional_counts():
    plan, order = _bucket_order({(72, 56): 7, (56, 72): 10}, batch_size=4)
    epochs = 8
    total = sum((epochs * len(order.items[b])) // 4 for b in order.buckets)
    counts = Counter(order.bucket_of(index) for index in range(total))
    assert counts == {b: epochs * len(order.items[b]) // 4 for b in order.buckets}


def test_bucket_order_random_access_matches_sequence():
    _, sequential = _bucket_order({(72, 56): 7, (56, 72): 10, (64, 64): 5}, batch_size=4)
    keys = [sequential.micro_batch(u) for u in range(30)]
    _, fresh = _bucket_order({(72, 56): 7, (56, 72): 10, (64, 64): 5}, batch_size=4)
    assert fresh.micro_batch(29) == keys[29]
    assert fresh.micro_batch(3) == keys[3]


def test_bucket_order_depends_on_seed():
    _, first = _bucket_order({(72, 56): 8, (56, 72): 8}, batch_size=4, seed=0)
    _, second = _bucket_order({(72, 56): 8, (56, 72): 8}, batch_size=4, seed=1)
    assert [first.micro_batch(u) for u in range(4)] != [second.micro_batch(u) for u in range(4)]


def test_rank_samplers_partition_micro_batches():
    order = ShuffledOrder(num_items=9, batch_size=2, seed=5)
    world, accum, steps = 2, 3, 4
    per_rank = []
    for rank in range(world):
        sampler = iter(RankBatchSampler(order, start_step=0, grad_accum=accum, world_size=world,
                                        rank=rank))
        per_rank.append([next(sampler) for _ in range(steps * accum)])
    merged = sorted((micro_batch_index(step, micro, accum, world, rank), batch)
                    for rank in range(world) for position, batch in enumerate(per_rank[rank])
                    for step, micro in [divmod(position, accum)])
    assert [index for index, _ in merged] == list(range(world * accum * steps))
    assert [batch for _, batch in merged] == [order.micro_batch(u)
                                              for u in range(world * accum * steps)]


def test_rank_sampler_resumes_at_step():
    order = ShuffledOrder(num_items=9, batch_size=2, seed=5)
    full = iter(RankBatchSampler(order, start_step=0, grad_accum=2, world_size=1, rank=0))
    batches = [next(full) for _ in range(6)]
    resumed = iter(RankBatchSampler(order, start_step=2, grad_accum=2, world_size=1, rank=0))
    assert [next(resumed), next(resumed)] == batches[4:6]
