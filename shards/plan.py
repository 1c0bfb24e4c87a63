"""The epoch plan: which samples every (rank, worker) slot reads, and how many batches it yields.

Non-resampled, an epoch lays the sequence shards of all folders end to end (in a shuffled order when
``shuffle_shards``) and cuts that sample sequence into consecutive runs, one per slot, each a whole number of
batches long. A run is a list of :class:`ShardSlice` sample ranges; a shard may be split between slots. Every
rank gets ``total // (batch_size * world_size)`` batches, whatever the shard count, and only the remainder
after the last whole global batch is left out of the epoch (see :func:`make_plan`).

An epoch resumed on another number of ranks goes on with a :class:`RegroupedPlan` (:func:`regroup`): the batches
the saved slots had still to yield (:func:`rest_of_epoch`), dealt to the new slots as ranges of the epoch's first
plan, so every one of them is yielded once and by the same pipeline (same samples, shuffle and flips) as it would
have been; only the ``rest mod world_size`` batches that cannot be dealt evenly are left out of that epoch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from shards.stream_config import StreamConfig

PLAN_VERSION = 2
"""Bumped whenever the same inputs give another plan: a saved stream position is only valid within one version
(1: whole shards per slot; 2: sample ranges of the shards laid end to end)."""


@dataclass(frozen=True)
class ShardRef:
    """One sequence shard of one domain folder."""

    domain: int
    url: str
    samples: int


@dataclass(frozen=True)
class ShardSlice:
    """Samples ``start`` .. ``stop - 1`` of a shard, counted in tar order."""

    shard: ShardRef
    start: int
    stop: int

    @property
    def url(self) -> str:
        return self.shard.url

    @property
    def domain(self) -> int:
        return self.shard.domain

    @property
    def samples(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class EpochPlan:
    """Who reads what in one epoch, and how many batches each (rank, worker) yields; the same on every rank."""

    epoch: int
    batch_size: int
    resampled: bool
    total_samples: int
    """Sequence samples in all shards of all folders."""
    slots: tuple[tuple[tuple[ShardSlice, ...], ...], ...]
    """[rank][worker] -> the sample ranges that worker reads, in order (empty when resampled: workers draw
    whole shards from all)."""
    worker_batches: tuple[tuple[int, ...], ...]
    """[rank][worker] -> batches that worker yields this epoch."""

    @property
    def batches(self) -> int:
        """Batches per rank, equal on every rank."""
        return sum(self.worker_batches[0])

    @property
    def dropped_samples(self) -> int:
        """Samples not covered by the epoch: those after the last whole global batch."""
        return self.total_samples - self.batches * self.batch_size * len(self.worker_batches)

    def batches_before(self, rank: int, k: int) -> tuple[int, ...]:
        """How many of the rank's first ``k`` batches each worker yields (the DataLoader takes them round-robin)."""
        return tuple(_round_robin_counts(self.worker_batches[rank], k))

    def worker_of(self, rank: int, k: int) -> int:
        """The worker that yields the rank's batch ``k`` (0-based, k < batches)."""
        caps, done = self.worker_batches[rank], self.batches_before(rank, k)
        # the round-robin goes on with the least advanced worker that has batches left, lowest id first
        return min((n, w) for w, (n, cap) in enumerate(zip(done, caps)) if n < cap)[1]


def _round_robin_counts(caps: Sequence[int], k: int) -> list[int]:
    """Items per queue among the first ``k`` taken round-robin from queues of lengths ``caps``, skipping empty ones."""
    if not 0 <= k <= sum(caps):
        raise ValueError(f"cannot take {k} batches from workers holding {list(caps)}")
    lo, hi = 0, max(caps, default=0)  # lo: the largest number of full rounds that fits in k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(min(c, mid) for c in caps) <= k else (lo, mid - 1)
    counts = [min(c, lo) for c in caps]
    rest = k - sum(counts)
    for w, cap in enumerate(caps):
        if rest and cap > lo:
            counts[w] += 1
            rest -= 1
    return counts


def make_plan(
    shards: Sequence[ShardRef], epoch: int, world_size: int, num_workers: int, cfg: StreamConfig
) -> EpochPlan:
    """The plan of one epoch; a pure function of its arguments, so every rank computes the same.

    With B = ``cfg.batch_size``, W = ``world_size``, n = max(1, ``num_workers``) and T samples in all, every rank
    yields ``p = T // (B * W)`` batches, spread over its workers as the DataLoader's round-robin takes them
    (worker counts differ by at most one). Non-resampled, slot (r, w) reads the next ``worker_batches[r][w] * B``
    samples of the shards laid end to end; the slots take ``p * B * W`` samples in all, each at most once, and
    leave out the rest::

        dropped = T - p * B * W = T mod (B * W) <= B * W - 1

    whatever the shard count and sizes (slices of equal size, B - 1 partial-batch samples lost per slot plus
    rank totals differing by up to n, would bound it by W * n * (B - 1) + W * n = W * n * B only). Resampled,
    the counts are the same and workers draw whole shards with replacement.
    """
    n_slots = max(1, num_workers)
    total = sum(s.samples for s in shards)
    per_rank = total // (cfg.batch_size * world_size)
    if per_rank == 0:
        raise ValueError(
            f"{total} sequences in {len(shards)} shards are fewer than one global batch ({cfg.batch_size} per rank"
            f" x {world_size} ranks): use a smaller batch or fewer ranks"
        )
    worker_batches = tuple(tuple(_round_robin_counts([per_rank] * n_slots, per_rank)) for _ in range(world_size))
    if cfg.resampled:
        slots: tuple = tuple(tuple(() for _ in range(n_slots)) for _ in range(world_size))
    else:
        order = list(shards)
        if cfg.shuffle_shards:
            random.Random(f"momrec-shards:{cfg.seed}:{epoch}").shuffle(order)
        runs = _cut(order, [n * cfg.batch_size for rank in worker_batches for n in rank])
        slots = tuple(tuple(runs[r * n_slots : (r + 1) * n_slots]) for r in range(world_size))
    return EpochPlan(epoch, cfg.batch_size, cfg.resampled, total, slots, worker_batches)


def _cut(order: Sequence[ShardRef], lengths: Sequence[int]) -> list[tuple[ShardSlice, ...]]:
    """Consecutive runs of ``lengths[i]`` samples of the shards laid end to end in ``order``."""
    assert sum(lengths) <= sum(s.samples for s in order)
    runs: list[tuple[ShardSlice, ...]] = []
    shard, offset = 0, 0
    for length in lengths:
        run = []
        while length:
            if offset == order[shard].samples:
                shard, offset = shard + 1, 0
                continue
            take = min(length, order[shard].samples - offset)
            run.append(ShardSlice(order[shard], offset, offset + take))
            offset, length = offset + take, length - take
        runs.append(tuple(run))
    return runs


# ---- an epoch resumed on another number of ranks ------------------------------------------------------------


@dataclass(frozen=True)
class BatchRange:
    """Batches ``start`` .. ``stop - 1`` of slot (``rank``, ``worker``) of an epoch's first plan."""

    rank: int
    worker: int
    start: int
    stop: int

    @property
    def batches(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class RegroupedPlan(EpochPlan):
    """The rest of an epoch begun under ``base`` (another world size): ``slots[rank][worker]`` holds
    :class:`BatchRange` s of ``base`` (not sample ranges), which that worker yields in order."""

    base: EpochPlan
    left_out: int
    """Batches of the rest that could not be dealt evenly to the ranks (fewer than the ranks)."""

    @property
    def dropped_samples(self) -> int:
        return self.base.dropped_samples + self.left_out * self.batch_size


def _ranges(plan: EpochPlan, rank: int, worker: int) -> tuple[BatchRange, ...]:
    if isinstance(plan, RegroupedPlan):
        return plan.slots[rank][worker]
    return (BatchRange(rank, worker, 0, plan.worker_batches[rank][worker]),)


def drop_batches(ranges: Sequence[BatchRange], k: int) -> list[BatchRange]:
    """``ranges`` without their first ``k`` batches."""
    out = []
    for r in ranges:
        if k >= r.batches:
            k -= r.batches
            continue
        out.append(BatchRange(r.rank, r.worker, r.start + k, r.stop))
        k = 0
    return out


def rest_of_epoch(plan: EpochPlan, done: int) -> list[BatchRange]:
    """What the slots of ``plan`` have still to yield once every rank has yielded ``done`` batches, slot after slot,
    as ranges of the epoch's first plan."""
    rest: list[BatchRange] = []
    for rank, caps in enumerate(plan.worker_batches):
        before = plan.batches_before(rank, done)
        for worker in range(len(caps)):
            rest += drop_batches(_ranges(plan, rank, worker), before[worker])
    return rest


def regroup(base: EpochPlan, rest: Sequence[BatchRange], world_size: int, num_workers: int) -> RegroupedPlan:
    """Deal ``rest`` (ranges of ``base``) to ``world_size`` ranks of ``num_workers`` workers: every rank yields
    ``len(rest) // world_size`` batches (as :func:`make_plan` spreads them over workers), consecutive runs of
    ``rest`` in order; the remainder is left out."""
    total = sum(r.batches for r in rest)
    per_rank, n_slots = total // world_size, max(1, num_workers)
    worker_batches = tuple(tuple(_round_robin_counts([per_rank] * n_slots, per_rank)) for _ in range(world_size))
    runs, pending = [], list(rest)
    for length in (n for rank in worker_batches for n in rank):
        run: list[BatchRange] = []
        while length:
            head = pending.pop(0)
            take = min(length, head.batches)
            run.append(BatchRange(head.rank, head.worker, head.start, head.start + take))
            if take < head.batches:
                pending.insert(0, BatchRange(head.rank, head.worker, head.start + take, head.stop))
            length -= take
        runs.append(tuple(run))
    slots = tuple(tuple(runs[r * n_slots : (r + 1) * n_slots]) for r in range(world_size))
    left_out = total - per_rank * world_size
    return RegroupedPlan(base.epoch, base.batch_size, base.resampled, base.total_samples, slots, worker_batches,
                         base, left_out)  # fmt: skip
