from __future__ import annotations

import random

import pytest

from shards.plan import EpochPlan, ShardRef, ShardSlice, _round_robin_counts, make_plan
from shards.stream import SequenceStream
from shards.stream_config import StreamConfig


def _round_robin(caps: list[int]) -> list[int]:
    """Which worker yields each batch when a DataLoader takes them round-robin, skipping exhausted workers."""
    return [w for r in range(max(caps, default=0)) for w in range(len(caps)) if r < caps[w]]


def test_round_robin_bookkeeping_matches_a_simulation() -> None:
    rng = random.Random(0)
    for _ in range(300):
        caps = [rng.randrange(6) for _ in range(rng.randint(1, 5))]
        order = _round_robin(caps)
        k = rng.randint(0, len(order))
        done = _round_robin_counts(caps, k)
        assert done == [order[:k].count(w) for w in range(len(caps))]
        if k == len(order):
            continue
        plan = EpochPlan(0, 1, False, 0, (), (tuple(caps),))
        first = plan.worker_of(0, k)
        assert first == order[k]
        # a fresh DataLoader whose worker i plays worker first + i, each holding its remaining batches,
        # continues the uninterrupted order exactly
        n = len(caps)
        rotated = [(first + i) % n for i in range(n)]
        resumed = _round_robin([caps[w] - done[w] for w in rotated])
        assert [rotated[i] for i in resumed] == order[k:]


def _shards(sizes: list[int]) -> list[ShardRef]:
    return [ShardRef(i % 2, f"shard-{i}.tar", n) for i, n in enumerate(sizes)]


def check_plan(plan: EpochPlan, shards: list[ShardRef], world: int, workers: int, batch: int) -> None:
    """Every guarantee of a non-resampled plan, including the bound on the samples it leaves out."""
    n_slots = max(1, workers)
    total = sum(s.samples for s in shards)
    assert plan.total_samples == total and len(plan.slots) == len(plan.worker_batches) == world
    assert {sum(rank) for rank in plan.worker_batches} == {plan.batches} == {total // (batch * world)}
    for rank, counts in zip(plan.slots, plan.worker_batches):
        assert len(rank) == len(counts) == n_slots and max(counts) - min(counts) <= 1
        # each slot reads exactly the samples of its batches: rank totals are equal, not just close
        assert [sum(piece.samples for piece in run) for run in rank] == [c * batch for c in counts]
    pieces = [piece for rank in plan.slots for run in rank for piece in run]
    assert all(0 <= p.start < p.stop <= p.shard.samples for p in pieces)
    read = [(p.url, i) for p in pieces for i in range(p.start, p.stop)]
    assert len(read) == len(set(read)) == plan.batches * batch * world  # each sample at most once
    _check_contiguous(pieces)
    # Only what is left after the last whole global batch is dropped: T mod (B * W) <= W * B - 1, within the
    # bound W * n * (B - 1) + W * n of slices of equal size (make_plan's docstring has the argument).
    assert plan.dropped_samples == total - len(read) == total % (batch * world)
    assert plan.dropped_samples <= world * batch - 1 <= world * n_slots * (batch - 1) + world * n_slots


def _check_contiguous(pieces: list[ShardSlice]) -> None:
    """The slots' pieces, rank by rank and worker by worker, are one walk through the shards laid end to end."""
    visited = []
    for prev, piece in zip([None, *pieces], pieces):
        if prev is not None and piece.shard == prev.shard:
            assert piece.start == prev.stop
            continue
        assert piece.start == 0 and (prev is None or prev.stop == prev.shard.samples)
        visited.append(piece.shard)
    assert len(visited) == len(set(visited))


LAYOUTS = [
    # (world, workers, batch, shard sizes)
    (2, 2, 4, [37]),  # fewer shards than slots: one shard read by all four
    (2, 2, 4, [7, 3, 11, 5, 9]),  # the two test domains: 5 shards over 4 slots
    (1, 0, 4, [7, 3, 11, 5, 9]),
    (2, 1, 3, [7, 3, 11, 5, 9]),
    (3, 2, 2, [7, 3, 11, 5, 9]),
    (4, 2, 8, [7, 3, 11, 5, 9]),  # a rank's single batch: one worker yields it, the other none
    (2, 4, 5, [0, 64, 1, 0, 33]),  # empty shards
    (8, 3, 7, [1] * 200),  # many tiny shards
    (3, 3, 16, [500, 13]),  # one huge shard
]


@pytest.mark.parametrize(("world", "workers", "batch", "sizes"), LAYOUTS)
@pytest.mark.parametrize("shuffle", [True, False])
def test_plan_is_balanced_reads_each_sample_once_and_drops_only_the_remainder(
    world: int, workers: int, batch: int, sizes: list[int], shuffle: bool
) -> None:
    shards = _shards(sizes)
    cfg = StreamConfig(batch_size=batch, shuffle_shards=shuffle)
    for epoch in range(3):
        check_plan(make_plan(shards, epoch, world, workers, cfg), shards, world, workers, batch)


def test_plan_over_random_layouts() -> None:
    rng = random.Random(1)
    for _ in range(300):
        world, workers, batch = rng.randint(1, 6), rng.randint(0, 4), rng.randint(1, 9)
        sizes = [rng.choice([0, 1, rng.randint(1, 40)]) for _ in range(rng.randint(1, 12))]
        if sum(sizes) < world * batch:
            continue
        shards = _shards(sizes)
        cfg = StreamConfig(batch_size=batch, seed=rng.randrange(9))
        check_plan(make_plan(shards, rng.randrange(5), world, workers, cfg), shards, world, workers, batch)


def test_plan_reshuffles_per_epoch_and_seed_only_when_asked() -> None:
    shards = _shards([7, 3, 11, 5, 9])

    def slots(epoch: int, **options) -> tuple:
        return make_plan(shards, epoch, 2, 2, StreamConfig(batch_size=4, **options)).slots

    assert slots(0) == slots(0) and slots(0) != slots(1) and slots(0) != slots(0, seed=3)
    assert slots(0, shuffle_shards=False) == slots(1, shuffle_shards=False)
    in_order = [p.url for rank in slots(0, shuffle_shards=False) for run in rank for p in run]
    assert in_order == sorted(in_order)


def test_resampled_plan_counts_and_no_slices() -> None:
    shards = _shards([7, 3, 11, 5, 9])
    plan = make_plan(shards, 0, 2, 2, StreamConfig(batch_size=3, resampled=True))
    assert plan.batches == 35 // (3 * 2) and plan.slots == (((), ()), ((), ()))
    assert {sum(rank) for rank in plan.worker_batches} == {plan.batches}


def test_plan_with_too_little_data_says_what_to_do(two_domains) -> None:
    folders = [d.folder for d in two_domains]
    for resampled in (False, True):
        cfg = StreamConfig(batch_size=8, resampled=resampled)
        with pytest.raises(ValueError, match="35 sequences .* fewer than one global batch .* smaller batch"):
            SequenceStream(folders, cfg, rank=0, world_size=5).plan()
        # 35 sequences over 4 ranks x 2 workers: whole shards gave some rank no batch; slices give each one
        assert len(SequenceStream(folders, cfg, rank=0, world_size=4)) == 35 // (8 * 4)
