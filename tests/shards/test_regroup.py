"""A stream position saved on one world size, resumed on another (shards.plan.regroup): the rest of the epoch is
dealt to the new ranks, every batch of it yielded once and exactly as the uninterrupted epoch yields it."""

from __future__ import annotations

import logging

import pytest
import torch

from shards.collate import Batch
from shards.plan import BatchRange, regroup, rest_of_epoch
from shards.stream import SequenceStream
from tests.shards.test_stream import small_cfg


def key(batch: Batch) -> tuple:
    return tuple(zip(batch.user_domain.tolist(), batch.user_index.tolist()))


def same(a: Batch, b: Batch) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("seq", "item_index", "item_domain", "pixel_values"))


def take(stream: SequenceStream, k: int) -> list[Batch]:
    out = []
    for batch in stream:
        out.append(batch)
        if len(out) == k:
            break
    return out


def streams(folders: list, cfg, world: int) -> list[SequenceStream]:
    out = [SequenceStream(folders, cfg, rank=r, world_size=world) for r in range(world)]
    for s in out:
        s.set_epoch(1)
    return out


def test_regroup_deals_the_rest_in_order_and_leaves_out_less_than_a_batch_per_rank() -> None:
    rest = [BatchRange(0, 0, 1, 3), BatchRange(0, 1, 2, 3), BatchRange(1, 0, 0, 4)]  # 7 batches
    plan = regroup(_FakePlan(), rest, world_size=2, num_workers=2)
    assert plan.batches == 3 and plan.left_out == 1
    assert plan.slots[0] == ((BatchRange(0, 0, 1, 3),), (BatchRange(0, 1, 2, 3),))
    assert plan.slots[1] == ((BatchRange(1, 0, 0, 2),), (BatchRange(1, 0, 2, 3),))
    rest = [BatchRange(0, 0, 2, 3), BatchRange(0, 1, 2, 3), BatchRange(1, 0, 1, 2), BatchRange(1, 0, 2, 3)]
    assert rest_of_epoch(plan, 1) == rest  # the first batch of each rank came from its worker 0


class _FakePlan:
    epoch, batch_size, resampled, total_samples = 0, 1, False, 0


@pytest.mark.parametrize("resampled", [False, True])
def test_two_ranks_then_one_then_two_see_every_batch_of_the_epoch_once(two_domains, caplog, resampled) -> None:
    cfg = small_cfg(batch_size=3, augment=True, resampled=resampled)  # 35 sequences: 5 batches per rank on 2
    folders = [d.folder for d in two_domains]
    full = [b for s in streams(folders, cfg, 2) for b in s]
    assert len(full) == 10

    two = streams(folders, cfg, 2)
    seen = [b for s in two for b in take(s, 2)]  # 2 of 5 on each rank
    one = SequenceStream(folders, cfg, rank=0, world_size=1)
    with caplog.at_level(logging.INFO, logger="shards.stream"):
        one.load_state_dict(two[1].state_dict(), regroup=True)
    assert "resumed on 1 ranks a position saved on 2" in caplog.text
    assert (one.epoch, one.batches_done, len(one), one.starts_epoch) == (1, 0, 6, False)
    seen += take(one, 3)  # 3 of the 6 left
    state = one.state_dict()
    assert state["world_size"] == 1 and state["regrouped"]["world_size"] == 2

    again = SequenceStream(folders, cfg, rank=0, world_size=1)  # the same world: the regrouped rest, exactly
    again.load_state_dict(state)
    assert [key(b) for b in again] == [key(b) for b in one]

    last = [SequenceStream(folders, cfg, rank=r, world_size=2) for r in range(2)]
    for s in last:
        s.load_state_dict(state, regroup=True)
    assert [len(s) for s in last] == [1, 1]  # 3 left: one each, one left out
    seen += [b for s in last for b in s]
    assert len(seen) == 9 and len({key(b) for b in seen}) == 9  # nothing twice, one batch left out
    by_key = {key(b): b for b in full}
    assert all(key(b) in by_key and same(b, by_key[key(b)]) for b in seen)  # the same samples, flips and order

    for s in last:  # the next epoch is this world's own
        s.set_epoch(2)
    assert [len(s) for s in last] == [5, 5] and "regrouped" not in last[0].state_dict()


def test_positions_at_epoch_boundaries_need_no_regrouping(two_domains) -> None:
    cfg = small_cfg(batch_size=3)
    folders = [d.folder for d in two_domains]
    start = streams(folders, cfg, 2)[0].state_dict()
    one = SequenceStream(folders, cfg, rank=0, world_size=1)
    one.load_state_dict(start, regroup=True)
    assert (one.epoch, one.batches_done, len(one), one.starts_epoch) == (1, 0, 11, True)
    one.load_state_dict({**start, "batches_done_in_epoch": 5}, regroup=True)  # the epoch was over
    assert (one.epoch, one.batches_done, one.starts_epoch) == (2, 0, True)
    with pytest.raises(ValueError, match="setup changed: world_size"):
        one.load_state_dict(start)
