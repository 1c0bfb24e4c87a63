from __future__ import annotations

import logging
import math
import random
from typing import TYPE_CHECKING

import pytest
import torch

from shards import schema
from shards.stream import (
    Batch,
    Collator,
    EpochPlan,
    SequenceStream,
    StreamConfig,
    _round_robin_counts,
    make_plan,
    split_example,
)

if TYPE_CHECKING:
    from conftest import Domain


def small_cfg(**overrides) -> StreamConfig:
    options = dict(batch_size=4, num_workers=2, shuffle_buffer=8, image_size=16, max_text_len=16, max_seq_len=5)
    return StreamConfig(**{**options, **overrides})


def users(batch: Batch) -> list[tuple[int, int]]:
    return list(zip(batch.user_domain.tolist(), batch.user_index.tolist()))


def check_against_truth(batch: Batch, domains: list[Domain], cfg: StreamConfig) -> None:
    """Every row holds its user's split history (and target) as rows of the batch's item table."""
    for b, (d, u) in enumerate(users(batch)):
        full = domains[d].sequences[u].item_indices()
        end = len(full) - (1 if cfg.split == "test" else 2)
        history = full[max(0, end - cfg.max_seq_len) : end]
        rows = batch.seq[b][batch.seq_mask[b]]
        assert batch.item_index[rows].tolist() == history
        assert (batch.item_domain[rows] == d).all()
        assert not batch.seq_mask[b, len(history) :].any() and (batch.seq[b, len(history) :] == -1).all()
        if cfg.split != "train":
            t = int(batch.target[b])
            assert (int(batch.item_domain[t]), int(batch.item_index[t])) == (d, full[end])


# ---- config and splits ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"batch_size": 0},
        {"num_workers": -1},
        {"shuffle_buffer": -5},
        {"max_seq_len": 0},
        {"split": "dev"},
        {"max_text_len": 1},
        {"image_size": 0},
        {"image_std": (0.2, 0.0, 0.2)},
        {"image_mean": (0.5, 0.5)},
    ],
)
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        StreamConfig(**bad)


def test_config_defaults_and_lists() -> None:
    cfg = StreamConfig(image_mean=[0.5, 0.5, 0.5])
    assert cfg.image_mean == (0.5, 0.5, 0.5) and cfg.batch_size == 32 and cfg.split == "train"
    assert cfg.text_model.endswith("model")


def _seq(n: int) -> schema.Sequence:
    items = tuple(schema.Item(index=100 + i, id=str(i), text=None) for i in range(n))
    return schema.Sequence(
        index=7, id="u", items=items, seq=tuple(range(n)), timestamps=tuple(float(t) for t in range(n))
    )


@pytest.mark.parametrize(
    ("split", "max_len", "history", "target"),
    [
        ("train", 50, [0, 1, 2, 3, 4], None),
        ("valid", 50, [0, 1, 2, 3, 4], 5),
        ("test", 50, [0, 1, 2, 3, 4, 5], 6),
        ("train", 3, [2, 3, 4], None),
        ("valid", 2, [3, 4], 5),
        ("test", 4, [2, 3, 4, 5], 6),
    ],
)
def test_split_and_truncation(split: str, max_len: int, history: list[int], target: int | None) -> None:
    ex = split_example(1, _seq(7), split, max_len)
    assert list(ex.history) == history and ex.target == target
    assert ex.timestamps == tuple(float(p) for p in history) and (ex.domain, ex.user_index) == (1, 7)


# ---- collation ----------------------------------------------------------------------------------------


def _examples(domains: list[Domain], split: str, n: int = 6) -> list:
    return [split_example(d, dom.sequences[u], split, 5) for d, dom in enumerate(domains) for u in range(n)]


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_collate_item_table(two_domains: list[Domain], split: str) -> None:
    cfg = small_cfg(split=split)
    batch = Collator(cfg)(_examples(two_domains, split))
    check_against_truth(batch, two_domains, cfg)
    keys = list(zip(batch.item_domain.tolist(), batch.item_index.tolist()))
    assert len(keys) == len(set(keys))  # each distinct item once
    used = set(batch.seq[batch.seq_mask].tolist()) | set(batch.target.tolist() if batch.target is not None else [])
    assert used == set(range(len(keys)))  # and only items the batch uses
    assert (batch.target is None) == (split == "train")
    items = [two_domains[d].items[i] for d, i in keys]
    assert batch.has_text.tolist() == [it.text is not None for it in items]
    assert batch.has_image.tolist() == [it.image is not None for it in items]


def test_collate_texts_images_and_times(two_domains: list[Domain]) -> None:
    cfg = small_cfg()
    batch = Collator(cfg)(_examples(two_domains, "train"))
    U = len(batch.item_index)
    assert batch.input_ids.shape == batch.attention_mask.shape and batch.input_ids.shape[0] == U
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.long
    assert batch.input_ids.shape[1] <= cfg.max_text_len
    lengths = batch.attention_mask.sum(1)
    assert (lengths[~batch.has_text] == 2).all() and (lengths[batch.has_text] > 2).all()  # [CLS] [SEP] only
    n_img = int(batch.has_image.sum())
    assert batch.pixel_values.shape == (n_img, 3, 16, 16) and batch.pixel_values.dtype == torch.float32
    assert sorted(batch.image_row[batch.has_image].tolist()) == list(range(n_img))
    assert (batch.image_row[~batch.has_image] == -1).all()
    assert batch.timestamps.dtype == torch.float64 and batch.timestamps.shape == batch.seq.shape
    for b, (d, u) in enumerate(users(batch)):
        known = two_domains[d].sequences[u].timestamps is not None
        assert torch.isnan(batch.timestamps[b][batch.seq_mask[b]]).all() != known
    moved = batch.to("cpu")
    assert torch.equal(moved.seq, batch.seq) and moved.target is None and len(moved) == len(batch)


def test_collate_drops_undecodable_image(make_domain) -> None:
    dom = make_domain("shop", [12], bad_images=[0])
    examples = [split_example(0, s, "test", 5) for s in dom.sequences.values()]
    with_bad = [ex for ex in examples if 0 in [ex.items[p].index for p in (*ex.history, ex.target)]]
    assert with_bad, "fixture: some sequence should hold item 0"
    collate = Collator(small_cfg(split="test"))
    batch = collate(with_bad)
    row = batch.item_index.tolist().index(0)
    assert not batch.has_image[row] and batch.image_row[row] == -1
    assert batch.stats == {"bad_images": 1}  # once per batch, though several sequences hold the item
    assert batch.pixel_values.shape[0] == int(batch.has_image.sum())
    assert collate(with_bad).stats == {"bad_images": 1}  # counters restart with every batch


# ---- the epoch plan ---------------------------------------------------------------------------------


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


@pytest.mark.parametrize(("world", "workers", "batch"), [(1, 0, 4), (2, 2, 4), (2, 1, 3), (3, 2, 2)])
def test_plan_is_balanced_and_covers_each_shard_once(two_domains, world: int, workers: int, batch: int) -> None:
    stream = SequenceStream([d.folder for d in two_domains], small_cfg(batch_size=batch), rank=0, world_size=world)
    for epoch in range(3):
        plan = make_plan(stream.shards, epoch, world, workers, small_cfg(batch_size=batch))
        assert {sum(rank) for rank in plan.worker_batches} == {plan.batches}
        assigned = [s for rank in plan.slots for slot in rank for s in slot]
        assert sorted(s.url for s in assigned) == sorted(s.url for s in stream.shards)
        for rank, counts in zip(plan.slots, plan.worker_batches):
            assert all(c <= sum(s.samples for s in slot) // batch for slot, c in zip(rank, counts))
        # ranks are filled within one shard of each other, and each rank loses < batch per worker to partial
        # batches: dropped <= (world - 1) * largest shard + world * workers * (batch - 1)
        bound = (world - 1) * max(s.samples for s in stream.shards) + world * max(1, workers) * (batch - 1)
        assert plan.dropped_samples == plan.total_samples - plan.batches * batch * world <= bound


def test_plan_with_too_little_data_says_what_to_do(two_domains) -> None:
    cfg = small_cfg(batch_size=8)
    with pytest.raises(ValueError, match="samples-per-shard.*resampled=True"):
        SequenceStream([d.folder for d in two_domains], cfg, rank=0, world_size=4).plan()
    resampled = SequenceStream([d.folder for d in two_domains], small_cfg(batch_size=8, resampled=True), 0, 4)
    assert len(resampled) == 35 // (8 * 4)


def test_rank_from_environment(two_domains, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    stream = SequenceStream([d.folder for d in two_domains], small_cfg(batch_size=2))
    assert (stream.rank, stream.world_size) == (1, 3)
    with pytest.raises(ValueError, match="rank 3"):
        SequenceStream([d.folder for d in two_domains], small_cfg(), rank=3, world_size=3)


# ---- streaming over ranks and workers ----------------------------------------------------------------


def run_ranks(domains: list[Domain], cfg: StreamConfig, world: int = 2, epoch: int = 0) -> list[list[Batch]]:
    """The batches of every rank, built as separate streams the way each rank would."""
    per_rank = []
    for rank in range(world):
        stream = SequenceStream([d.folder for d in domains], cfg, rank=rank, world_size=world)
        stream.set_epoch(epoch)
        batches = list(stream)
        assert len(batches) == len(stream) > 0
        per_rank.append(batches)
    return per_rank


def test_two_ranks_two_workers_equal_counts_each_sample_once(two_domains: list[Domain], caplog) -> None:
    cfg = small_cfg()
    orders = []
    for epoch in (0, 1):
        with caplog.at_level(logging.INFO, logger="shards.stream"):
            per_rank = run_ranks(two_domains, cfg, world=2, epoch=epoch)
        assert len(per_rank[0]) == len(per_rank[1])
        seen = [u for batches in per_rank for b in batches for u in users(b)]
        assert len(seen) == len(set(seen))  # each sequence at most once per epoch, across ranks
        total = sum(d.n_samples for d in two_domains)
        plan = SequenceStream([d.folder for d in two_domains], cfg, rank=0, world_size=2).plan(epoch)
        assert plan.dropped_samples == total - len(seen)
        assert plan.dropped_samples <= 1 * 11 + 2 * 2 * (cfg.batch_size - 1)  # see the plan test for the bound
        for batches in per_rank:
            for b in batches:
                assert len(b) == cfg.batch_size
                check_against_truth(b, two_domains, cfg)
        orders.append([users(b) for b in per_rank[0]])
    assert orders[0] != orders[1]  # a new epoch, a new order
    assert any("leaves out" in r.getMessage() for r in caplog.records)  # 5 shards over 4 slots lose a lot


def test_same_seed_same_batches_new_seed_new_order(two_domains: list[Domain]) -> None:
    first = run_ranks(two_domains, small_cfg(num_workers=1), world=1)[0]
    again = run_ranks(two_domains, small_cfg(num_workers=1), world=1)[0]
    other = run_ranks(two_domains, small_cfg(num_workers=1, seed=5), world=1)[0]
    assert [users(b) for b in first] == [users(b) for b in again]
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, again))
    assert [users(b) for b in first] != [users(b) for b in other]


def test_resampled_ranks_get_equal_counts(two_domains: list[Domain]) -> None:
    cfg = small_cfg(resampled=True, batch_size=3)
    per_rank = run_ranks(two_domains, cfg, world=2)
    expected = math.floor(35 / (3 * 2))
    assert [len(b) for b in per_rank] == [expected, expected]


# ---- resume -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "resampled"), [(3, False), (10, False), (5, True)])
def test_resume_continues_exactly(two_domains: list[Domain], k: int, resampled: bool) -> None:
    # batch 3 on one rank: the two workers plan 6 and 5 batches, so the round-robin has a tail (k=10)
    cfg = small_cfg(batch_size=3, augment=True, resampled=resampled)
    folders = [d.folder for d in two_domains]
    stream = SequenceStream(folders, cfg, rank=0, world_size=1)
    stream.set_epoch(1)
    assert list(stream.plan().worker_batches[0]) == [6, 5]
    full = list(stream)

    stream = SequenceStream(folders, cfg, rank=0, world_size=1)
    stream.set_epoch(1)
    head = []
    for batch in stream:
        head.append(batch)
        if len(head) == k:
            break
    state = stream.state_dict()
    assert state["batches_done_in_epoch"] == k

    restored = SequenceStream(folders, cfg, rank=0, world_size=1)
    restored.load_state_dict(state)
    tail = list(restored)
    assert len(head) + len(tail) == len(full) == len(restored)
    for a, b in zip(head + tail, full):
        assert torch.equal(a.seq, b.seq) and torch.equal(a.item_index, b.item_index)
        assert torch.equal(a.item_domain, b.item_domain) and torch.equal(a.pixel_values, b.pixel_values)
    assert list(restored) == []  # the epoch is over until set_epoch
    restored.set_epoch(2)
    assert len(list(restored)) == len(restored)


def test_load_state_dict_rejects_another_setup(two_domains: list[Domain], make_domain) -> None:
    folders = [d.folder for d in two_domains]
    state = SequenceStream(folders, small_cfg(), rank=0, world_size=2).state_dict()
    for changed in (
        SequenceStream(folders, small_cfg(), rank=0, world_size=1),
        SequenceStream(folders, small_cfg(num_workers=1), rank=0, world_size=2),
        SequenceStream(folders, small_cfg(batch_size=2), rank=0, world_size=2),
        SequenceStream(folders[:1], small_cfg(), rank=0, world_size=2),
    ):
        with pytest.raises(ValueError, match="setup changed"):
            changed.load_state_dict(state)
    with pytest.raises(ValueError, match="outside epoch"):
        SequenceStream(folders, small_cfg(), rank=0, world_size=2).load_state_dict(
            {**state, "batches_done_in_epoch": 99}
        )


# ---- bad data -----------------------------------------------------------------------------------------


def _broken_domain(make_domain) -> Domain:
    dom = make_domain("broken", [9, 8, 10], bad_users=[2, 12], bad_images=[0])
    path = dom.folder / schema.shard_name("seqs", 2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the last shard is cut short: a tar error and lost samples
    return dom


def test_bad_samples_are_skipped_counted_logged_once_and_topped_up(make_domain, caplog) -> None:
    dom = _broken_domain(make_domain)
    cfg = small_cfg(num_workers=0, shuffle_buffer=4)
    stream = SequenceStream([dom.folder], cfg, rank=0, world_size=1)
    assert len(stream) == 27 // 4  # planned from the manifest, which counts the broken samples too
    with caplog.at_level(logging.WARNING, logger="shards.stream"):
        batches = list(stream)
    assert len(batches) == len(stream)
    seen = {u for b in batches for u in users(b)}
    assert not seen & {(0, 2), (0, 12)}
    assert stream.stats["bad_samples"] >= 2 and stream.stats["tar_errors"] >= 1 and stream.stats["topup_passes"] >= 1
    assert stream.stats["bad_samples"] == sum(b.stats.get("bad_samples", 0) for b in batches)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("user00000002" in m for m in messages) == 1  # re-read by the top-up, logged once
    assert any("seqs-000002.tar" in m and "tar content" in m for m in messages)


def test_bad_samples_keep_ranks_equal_with_workers(make_domain) -> None:
    dom = _broken_domain(make_domain)
    per_rank = run_ranks([dom], small_cfg(batch_size=3), world=2)
    assert len(per_rank[0]) == len(per_rank[1])
