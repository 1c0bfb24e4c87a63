"""The per-process pixel memo (shards.pixel_memo): each item image decoded once, batches bit-identical to decoding
every time, never a stale entry, a bounded size."""

from __future__ import annotations

import io
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from PIL import Image

import shards.pixel_memo
from shards import schema
from shards.collate import Collator, collate_items, split_example
from shards.pixel_memo import PixelMemo, pixel_memo
from shards.stream import SequenceStream
from shards.transforms import ImageDecodeError, crop_pixels, decode_image, stack_pixels
from tests.shards.conftest import BAD_IMAGE, tiny_jpeg
from tests.shards.test_stream import small_cfg

if TYPE_CHECKING:
    from tests.shards.conftest import Domain


@pytest.fixture(autouse=True)
def empty_memos():
    shards.pixel_memo._pixel_memos.clear()
    yield
    shards.pixel_memo._pixel_memos.clear()


def _batches(folders, **overrides) -> list:
    stream = SequenceStream(folders, small_cfg(**overrides), rank=0, world_size=1)
    return list(stream)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_batches_are_bit_identical_with_and_without_the_memo(two_domains: list[Domain], workers: int) -> None:
    folders = [d.folder for d in two_domains]
    for augment in (False, True):  # flips are applied to the memo's unflipped pixels at the batch copy
        on = _batches(folders, num_workers=workers, augment=augment, shuffle_buffer=0)
        off = _batches(folders, num_workers=workers, augment=augment, shuffle_buffer=0, image_memo_mb=0)
        assert len(on) == len(off) > 1
        for a, b in zip(on, off):
            assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.image_row, b.image_row)
            assert a.pixel_values.dtype == torch.uint8
    if workers == 0:  # the memo lives in this process: each distinct image was decoded once over both epochs
        memo = pixel_memo(16, 256 << 20)
        with_image = {(d, it.index) for d, dom in enumerate(two_domains) for it in dom.items if it.image is not None}
        assert memo.decoded == len(memo) <= len(with_image)
        assert set(memo.entries) <= with_image


def _gradient_jpeg(shift: int) -> bytes:
    """A JPEG whose columns differ (a left-right mirror changes it)."""
    pixels = np.zeros((20, 24, 3), dtype=np.uint8)
    pixels[:, :, 0] = np.linspace(0, 240, 24, dtype=np.uint8)[None, :]
    pixels[:, :, 1] = shift
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_flips_mirror_the_memo_pixels_and_leave_them_unflipped() -> None:
    items = tuple(schema.Item(index=i, id=f"g{i}", text=f"item {i}", image=_gradient_jpeg(20 * i)) for i in range(8))
    seq = schema.Sequence(index=0, id="u0", items=items, seq=tuple(range(8)), timestamps=None)
    examples = [split_example(0, seq, "train", 8)]
    plain = Collator(small_cfg(num_workers=0))(examples)
    flipped = Collator(small_cfg(num_workers=0, augment=True), flip_key="k")(examples)
    mirrored = [torch.equal(f, p.flip(-1)) for f, p in zip(flipped.pixel_values, plain.pixel_values)]
    same = [torch.equal(f, p) for f, p in zip(flipped.pixel_values, plain.pixel_values)]
    assert all(m != s for m, s in zip(mirrored, same)) and any(mirrored) and any(same)
    again = Collator(small_cfg(num_workers=0))(examples)  # the memo was not changed by the flipped copies
    assert torch.equal(again.pixel_values, plain.pixel_values)


def test_the_memo_gives_what_decoding_gives() -> None:
    data = tiny_jpeg((200, 40, 90), (40, 24))
    memo = PixelMemo(16, 1 << 20)
    first = memo.pixels((0, 3), data)
    assert torch.equal(torch.from_numpy(first.copy()), crop_pixels(decode_image(data, 16), 16))
    assert memo.pixels((0, 3), data) is first and memo.decoded == 1  # a hit: the same array, not decoded again
    assert not first.flags.writeable  # shared by every batch holding the item: nobody may write into it
    with pytest.raises(ValueError):
        first[0, 0, 0] = 1


def test_other_bytes_under_the_same_key_are_decoded_never_a_stale_entry() -> None:
    memo = PixelMemo(16, 1 << 20)
    red, blue = tiny_jpeg((250, 0, 0), (20, 20)), tiny_jpeg((0, 0, 250), (20, 20))
    a = memo.pixels((0, 1), red)
    b = memo.pixels((0, 1), blue)  # another folder at domain position 0, item 1
    assert memo.decoded == 2 and len(memo) == 1
    assert a[0].mean() > 200 and b[2].mean() > 200 and b[0].mean() < 50
    assert memo.pixels((0, 1), bytes(bytearray(blue))) is b  # equal bytes (another object): a hit


def test_the_memo_stays_within_its_bytes_dropping_the_least_recently_used() -> None:
    images = [tiny_jpeg((10 * i, 80, 200 - 10 * i), (30, 20)) for i in range(6)]
    one = PixelMemo(16, 1 << 20)
    one.pixels((0, 0), images[0])
    cost = one.bytes  # pixels + JPEG bytes + bookkeeping of one entry (the images differ by a few bytes)
    memo = PixelMemo(16, 3 * cost + cost // 2)
    for i in range(3):
        memo.pixels((0, i), images[i])
    memo.pixels((0, 0), images[0])  # item 0 used again: item 1 is now the least recent
    memo.pixels((0, 3), images[3])
    assert set(memo.entries) == {(0, 0), (0, 2), (0, 3)} and memo.bytes <= memo.max_bytes
    assert memo.decoded == 4
    for i in range(6):
        memo.pixels((1, i), images[i])
    assert len(memo) == 3 and memo.bytes <= memo.max_bytes
    assert (
        memo.bytes == sum(p.nbytes + len(d) for d, p in memo.entries.values()) + 3 * shards.pixel_memo._ENTRY_OVERHEAD
    )


def test_a_memo_of_zero_bytes_keeps_nothing_and_bad_images_are_never_kept() -> None:
    data = tiny_jpeg((1, 2, 3))
    off = PixelMemo(16, 0)
    assert np.array_equal(off.pixels((0, 0), data), off.pixels((0, 0), data))
    assert off.decoded == 2 and len(off) == 0 and off.bytes == 0
    memo = PixelMemo(16, 1 << 20)
    for _ in range(2):
        with pytest.raises(ImageDecodeError):
            memo.pixels((0, 5), BAD_IMAGE)
    assert len(memo) == 0
    with pytest.raises(ValueError, match="max_bytes"):
        PixelMemo(16, -1)


def test_a_bad_image_is_counted_at_every_batch_that_holds_it(make_domain) -> None:
    dom = make_domain("bad", [6], bad_images={0, 2, 4})
    items = [(0, it) for it in dom.items]
    for _ in range(2):
        counts = Counter()
        table = collate_items(items, small_cfg(num_workers=0), counts)
        assert counts["bad_images"] == 3  # not hidden by the memo the first pass filled
    assert not table.has_image[[0, 2, 4]].any() and table.has_image[[3, 7]].all()


def test_stack_pixels_places_flips_and_placeholder_rows() -> None:
    a = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    out = stack_pixels([a, None, a], 4, [False, False, True], shared=False)
    assert out.shape == (3, 3, 4, 4) and out.dtype == torch.uint8
    assert torch.equal(out[0], torch.from_numpy(a)) and not out[1].any()
    assert torch.equal(out[2], torch.from_numpy(a).flip(-1))
    assert stack_pixels([], 4).shape == (0, 3, 4, 4)


def test_items_of_one_table_are_read_through_the_memo_once(two_domains: list[Domain]) -> None:
    items = [(d, it) for d, dom in enumerate(two_domains) for it in dom.items]
    cfg = small_cfg(num_workers=0)
    first = collate_items(items, cfg)
    memo = pixel_memo(cfg.image_size, cfg.image_memo_mb << 20)
    decoded = memo.decoded
    assert decoded == sum(it.image is not None for _, it in items)
    again = collate_items(items, cfg)  # a second catalog pass in the same process decodes nothing
    assert memo.decoded == decoded and torch.equal(again.pixel_values, first.pixel_values)
