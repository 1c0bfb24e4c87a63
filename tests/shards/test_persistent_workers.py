"""Persistent stream workers (StreamConfig.persistent_workers): forked once, they serve every epoch with the batches
new workers would give, from any position, and keep their memos."""

from __future__ import annotations

import multiprocessing
import os
from typing import TYPE_CHECKING

import pytest
import torch

import shards.pixel_memo
from shards.stream import SequenceStream
from tests.shards.test_stream import small_cfg

if TYPE_CHECKING:
    from tests.shards.conftest import Domain

FIELDS = ("seq", "item_domain", "item_index", "input_ids", "pixel_values", "image_row", "user_index")


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def _epochs(stream: SequenceStream, epochs: range) -> list:
    out = []
    for epoch in epochs:
        stream.set_epoch(epoch)
        out += list(stream)
    return out


def _stream(domains: list[Domain], persistent: bool, **overrides) -> SequenceStream:
    cfg = small_cfg(persistent_workers=persistent, augment=True, **overrides)
    return SequenceStream([d.folder for d in domains], cfg, rank=0, world_size=1)


def _pids(stream: SequenceStream) -> list[int]:
    pids = stream.worker_pids()
    assert len(pids) == stream.cfg.num_workers
    return pids


def test_persistent_workers_give_the_batches_of_new_workers_every_epoch(two_domains: list[Domain]) -> None:
    fresh = _epochs(_stream(two_domains, persistent=False), range(3))
    stream = _stream(two_domains, persistent=True)
    kept = _epochs(stream, range(3))
    assert len(kept) == len(fresh) > 6 and all(_same(a, b) for a, b in zip(kept, fresh))
    # each epoch shuffles anew: the persistent workers did not replay epoch 0
    per_epoch = len(fresh) // 3
    assert not all(_same(a, b) for a, b in zip(kept[:per_epoch], kept[per_epoch : 2 * per_epoch]))
    stream.close()


def test_a_pass_stopped_early_goes_on_where_it_stopped_and_a_resumed_position_is_exact(
    two_domains: list[Domain],
) -> None:
    reference = _epochs(_stream(two_domains, persistent=False), range(2))
    n = len(reference) // 2
    stream = _stream(two_domains, persistent=True)
    got = []
    for batch in stream:  # epoch 0, stopped after 2 batches: the workers have prefetched more
        got.append(batch)
        if len(got) == 2:
            break
    pids = _pids(stream)
    got += list(stream)  # the rest of epoch 0, by the same workers
    assert _pids(stream) == pids
    stream.set_epoch(1)
    got += list(stream)
    assert len(got) == len(reference) and all(_same(a, b) for a, b in zip(got, reference))
    # a position saved mid-epoch 1, loaded into the same (already running) stream
    saved = _stream(two_domains, persistent=False)
    saved.set_epoch(1)
    for _ in zip(range(3), saved):
        pass
    stream.load_state_dict(saved.state_dict())
    rest = list(stream)
    assert _pids(stream) == pids
    assert len(rest) == n - 3 and all(_same(a, b) for a, b in zip(rest, reference[n + 3 :]))
    stream.close()


def test_workers_are_forked_once_and_keep_their_pixel_memo(two_domains: list[Domain], monkeypatch) -> None:
    shards.pixel_memo._pixel_memos.clear()  # what the workers fork from: nothing decoded yet
    decoded = multiprocessing.Value("i", 0)  # shared with the forked workers
    decode = shards.pixel_memo.decode_image

    def counting(*args, **kw):
        with decoded.get_lock():
            decoded.value += 1
        return decode(*args, **kw)

    monkeypatch.setattr(shards.pixel_memo, "decode_image", counting)
    counts = {}
    for persistent in (True, False):
        stream = _stream(two_domains, persistent=persistent)
        decoded.value = 0
        _epochs(stream, range(1))
        first = decoded.value
        pids = _pids(stream) if persistent else None
        _epochs(stream, range(1, 3))
        counts[persistent] = (first, decoded.value - first)
        if persistent:
            assert _pids(stream) == pids
            stream.close()
            assert stream.worker_pids() == []
    assert counts[True][0] == counts[False][0] > 0  # the first epoch decodes alike
    assert counts[False][1] > 0  # new workers start with empty memos every epoch
    with_image = {(d, it.index) for d, dom in enumerate(two_domains) for it in dom.items if it.image is not None}
    # kept workers decode at most the images they had not met in epoch 0 (each worker has its own memo)
    assert counts[True][1] < counts[False][1] and counts[True][1] <= 2 * len(with_image) - counts[True][0]


def test_close_stops_the_workers_and_a_later_pass_starts_new_ones(two_domains: list[Domain]) -> None:
    stream = _stream(two_domains, persistent=True)
    first = list(stream)
    pids = _pids(stream)
    stream.close()
    for pid in pids:  # stopped and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    stream.set_epoch(0)
    again = list(stream)
    assert _pids(stream) != pids and all(_same(a, b) for a, b in zip(again, first))
    stream.close()
