from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import logging
import math
from collections import Counter
from typing import TYPE_CHECKING

import pytest
import torch

from shards import plan as plan_module
from shards import schema, stream, stream_config
from shards.collate import Batch, Collator, split_example
from shards.pipeline import TarErrors, _read_slice
from shards.plan import EpochPlan
from shards.stream import SequenceStream, _report
from shards.stream_config import StreamConfig
from shards.transforms import IMAGENET_MEAN, IMAGENET_STD, decode_image, images_to_tensor

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
    assert cfg.shuffle_buffer == 256  # raw samples carry every item's JPEG: see the field's docstring


def test_the_config_is_a_leaf_and_names_live_in_one_module() -> None:
    tree = ast.parse(inspect.getsource(stream_config))
    ours = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module.startswith("shards")}
    assert ours == {"shards.transforms"}  # not the stream, its plan or its collation: they all import the config
    assert not hasattr(stream, "__all__")  # importers take a name from where it lives
    assert not {"Collator", "Example", "split_example", "SPLITS", "ShardSlice"} & set(vars(stream))


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
    assert batch.pixel_values.shape == (n_img, 3, 16, 16) and batch.pixel_values.dtype == torch.uint8
    assert sorted(batch.image_row[batch.has_image].tolist()) == list(range(n_img))
    assert (batch.image_row[~batch.has_image] == -1).all()
    assert batch.timestamps.dtype == torch.float64 and batch.timestamps.shape == batch.seq.shape
    for b, (d, u) in enumerate(users(batch)):
        known = two_domains[d].sequences[u].timestamps is not None
        assert torch.isnan(batch.timestamps[b][batch.seq_mask[b]]).all() != known
    moved = batch.to("cpu")
    assert torch.equal(moved.seq, batch.seq) and moved.target is None and len(moved) == len(batch)
    assert torch.equal(moved.pixel_mean, batch.pixel_mean) and torch.equal(moved.pixel_std, batch.pixel_std)


def test_collate_pixels_are_uint8_and_normalize_on_demand(two_domains: list[Domain]) -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    cfg = small_cfg(image_mean=mean, image_std=std)
    batch = Collator(cfg)(_examples(two_domains, "train"))
    assert batch.pixel_mean.tolist() == pytest.approx(mean) and batch.pixel_std.tolist() == pytest.approx(std)
    assert batch.pixel_mean.shape == batch.pixel_std.shape == (3,) and batch.pixel_mean.dtype == torch.float32
    # the same images through the float path of the transforms: resized and cropped alike, then normalized
    images = [
        decode_image(two_domains[d].items[i].image, 16)
        for d, i, row in zip(batch.item_domain.tolist(), batch.item_index.tolist(), batch.image_row.tolist())
        if row >= 0
    ]
    order = batch.image_row[batch.has_image].argsort()
    assert torch.equal(batch.pixel_values, images_to_tensor([images[j] for j in order], 16, normalize=False))
    expected = images_to_tensor([images[j] for j in order], 16, mean, std)
    torch.testing.assert_close(batch.normalized_pixels(), expected, rtol=0, atol=1e-5)
    half = batch.normalized_pixels(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.shape == expected.shape
    torch.testing.assert_close(half.float(), expected, rtol=0, atol=0.008)  # rounded once: half a bf16 step
    assert Collator(small_cfg())(_examples(two_domains, "train")).pixel_mean.tolist() == pytest.approx(IMAGENET_MEAN)
    assert batch.pixel_std.tolist() != pytest.approx(IMAGENET_STD)


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


# ---- ranks ----------------------------------------------------------------------------------------


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


def planned_users(plan: EpochPlan, rank: int, domains: list[Domain]) -> set[tuple[int, int]]:
    """The (domain, user) of every sample in the rank's slices (the test domains number users in shard order)."""
    first_user = {}
    for d, dom in enumerate(domains):
        for number, start in enumerate(itertools.accumulate([0, *dom.shard_sizes[:-1]])):
            first_user[str(dom.folder / schema.shard_name("seqs", number))] = (d, start)
    found = set()
    for run in plan.slots[rank]:
        for piece in run:
            d, start = first_user[piece.url]
            found |= {(d, start + i) for i in range(piece.start, piece.stop)}
    return found


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
        # only the remainder after whole global batches (see the plan tests for the bound): 35 mod 8
        assert plan.dropped_samples == total % (2 * cfg.batch_size) == 3
        for rank, batches in enumerate(per_rank):
            assert {u for b in batches for u in users(b)} == planned_users(plan, rank, two_domains)
            for b in batches:
                assert len(b) == cfg.batch_size
                check_against_truth(b, two_domains, cfg)
        orders.append([users(b) for b in per_rank[0]])
    assert orders[0] != orders[1]  # a new epoch, a new order
    messages = [r.getMessage() for r in caplog.records]
    assert "epoch 0: 4 batches of 4 per rank x 2 ranks; 3 of 35 sequences not in this epoch" in messages
    assert not any("leaves out" in m for m in messages)  # shards split between slots: little is lost


def test_one_shard_feeds_every_rank_and_worker(make_domain) -> None:
    dom = make_domain("single", [37])
    cfg = small_cfg()
    for epoch in (0, 1):
        per_rank = run_ranks([dom], cfg, world=2, epoch=epoch)
        plan = SequenceStream([dom.folder], cfg, rank=0, world_size=2).plan(epoch)
        assert [len(b) for b in per_rank] == [37 // 8] * 2 and plan.dropped_samples == 37 % 8
        assert all(len(run) == 1 for rank in plan.slots for run in rank)  # four slices of the one shard
        seen = [u for batches in per_rank for b in batches for u in users(b)]
        assert len(seen) == len(set(seen)) == 37 - plan.dropped_samples
        for rank, batches in enumerate(per_rank):
            assert {u for b in batches for u in users(b)} == planned_users(plan, rank, [dom])
            for b in batches:
                check_against_truth(b, [dom], cfg)


def test_leaving_out_much_is_a_warning(two_domains: list[Domain], caplog) -> None:
    folders = [d.folder for d in two_domains]
    plan = SequenceStream(folders, small_cfg(batch_size=6), rank=0, world_size=2).plan()
    assert plan.dropped_samples == 35 % 12 == 11
    with caplog.at_level(logging.INFO, logger="shards.stream"):
        _report(plan)
    assert any("leaves out 31%" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def read_keys(shard: plan_module.ShardRef, start: int, stop: int, counts: Counter) -> list[str]:
    return [raw["__key__"] for raw in _read_slice(plan_module.ShardSlice(shard, start, stop), TarErrors([], counts))]


def test_read_slice_gives_exactly_its_samples(make_domain) -> None:
    dom = make_domain("one", [11])
    shard = plan_module.ShardRef(0, str(dom.folder / schema.shard_name("seqs", 0)), 11)
    counts = Counter()
    for start in range(11):
        for stop in range(start + 1, 12):
            assert read_keys(shard, start, stop, counts) == [schema.user_key(u) for u in range(start, stop)]
    assert not counts


def test_a_stream_without_content_reads_no_image_and_gives_the_same_sequences(two_domains: list[Domain]) -> None:
    shard = two_domains[0].folder / schema.shard_name("seqs", 0)
    ref = plan_module.ShardRef(0, str(shard), 4)
    whole = list(_read_slice(plan_module.ShardSlice(ref, 0, 4), TarErrors([], Counter())))
    lean = list(_read_slice(plan_module.ShardSlice(ref, 0, 4), TarErrors([], Counter()), images=False))
    assert [r["__key__"] for r in lean] == [r["__key__"] for r in whole]
    assert any(schema.is_image_field(f) for r in whole for f in r)  # the shard has item images ...
    assert not any(schema.is_image_field(f) for r in lean for f in r)  # ... that were not read
    with pytest.raises(schema.SampleError, match="declared in items but missing"):
        schema.decode_seq(lean[0])
    for a, b in zip(whole, lean, strict=True):
        full, ids_only = schema.decode_seq(a), schema.decode_seq(b, images=False)
        assert ids_only.seq == full.seq and [i.index for i in ids_only.items] == [i.index for i in full.items]
        assert all(i.image is None for i in ids_only.items)
    cfg = small_cfg(num_workers=0, shuffle_buffer=0, max_seq_len=50)
    with_content = list(SequenceStream([str(d.folder) for d in two_domains], cfg))
    without = list(SequenceStream([str(d.folder) for d in two_domains], dataclasses.replace(cfg, item_content=False)))
    assert len(without) == len(with_content) > 0
    for a, b in zip(with_content, without, strict=True):
        assert users(a) == users(b) and torch.equal(a.seq, b.seq) and torch.equal(a.item_index, b.item_index)
        check_against_truth(b, two_domains, cfg)


def test_read_slice_of_a_cut_shard_is_consistent(make_domain) -> None:
    dom = _broken_domain(make_domain)
    shard = plan_module.ShardRef(0, str(dom.folder / schema.shard_name("seqs", 2)), 10)
    counts = Counter()
    whole = read_keys(shard, 0, 10, counts)
    assert 0 < len(whole) < 10 and counts["tar_errors"] >= 1
    for k in range(1, 10):  # two slots splitting the cut shard read each sample at most once between them
        assert read_keys(shard, 0, k, counts) + read_keys(shard, k, 10, counts) == whole


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


@pytest.mark.parametrize(
    ("k", "resampled", "rank", "world", "caps"),
    [(3, False, 0, 1, [6, 5]), (10, False, 0, 1, [6, 5]), (5, True, 0, 1, [6, 5]), (3, False, 1, 2, [3, 2])],
)
def test_resume_continues_exactly(
    two_domains: list[Domain], k: int, resampled: bool, rank: int, world: int, caps: list[int]
) -> None:
    # batch 3: the two workers plan 6 and 5 batches (3 and 2 with two ranks), so the round-robin has a tail
    # (k=10); with two ranks, rank 1 reads slices that start inside shards
    cfg = small_cfg(batch_size=3, augment=True, resampled=resampled)
    folders = [d.folder for d in two_domains]
    stream = SequenceStream(folders, cfg, rank=rank, world_size=world)
    stream.set_epoch(1)
    assert list(stream.plan().worker_batches[rank]) == caps
    full = list(stream)

    stream = SequenceStream(folders, cfg, rank=rank, world_size=world)
    stream.set_epoch(1)
    head = []
    for batch in stream:
        head.append(batch)
        if len(head) == k:
            break
    state = stream.state_dict()
    assert state["batches_done_in_epoch"] == k

    restored = SequenceStream(folders, cfg, rank=rank, world_size=world)
    restored.load_state_dict(state)
    tail = list(restored)
    assert len(head) + len(tail) == len(full) == len(restored)
    for a, b in zip(head + tail, full):
        assert torch.equal(a.seq, b.seq) and torch.equal(a.item_index, b.item_index)
        assert torch.equal(a.item_domain, b.item_domain) and torch.equal(a.pixel_values, b.pixel_values)
        assert a.pixel_values.dtype == torch.uint8
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
    same = SequenceStream(folders, small_cfg(), rank=0, world_size=2)
    old_plan = {k: v for k, v in state.items() if k != "plan"}  # saved before slices: another assignment
    for saved in (old_plan, {**state, "plan": 1}):
        with pytest.raises(ValueError, match="setup changed: plan"):
            same.load_state_dict(saved)
    same.load_state_dict({**state, "batches_done_in_epoch": 2})
    assert same.batches_done == 2
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
