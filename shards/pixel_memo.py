"""Item images -> uint8 pixels, once per process: the memo that decodes, resizes and crops each item image once
instead of at every batch that holds the item (the texts' counterpart is :class:`shards.tokens.TokenMemo`).

A sequence sample carries the JPEG of every item of its user's history, so a popular item's image reaches a
DataLoader worker in many samples of an epoch; without the memo each is decoded again (``python -m benchmarks.stream``
measures what the memo saves). Flips are not memoized: an entry holds the unflipped pixels, and the batch copy
mirrors them.

Shape legend::

    S  the image side (StreamConfig.image_size)
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from shards.transforms import crop_pixels_chw, decode_image

_ENTRY_OVERHEAD = 400
"""Bytes an entry costs beyond its pixels and JPEG bytes (dict slot, key and value tuples, array and bytes headers;
rounded up)."""


class PixelMemo:
    """The uint8 (3, S, S) pixels of the item images this process has decoded, for one image side: each item's image
    is decoded, resized and cropped once per process (per DataLoader worker, which starts with its parent's memo when
    forked), not once per batch that holds it.

    Keyed by ``(domain, item index)``; an entry also keeps the JPEG bytes it was made from, and is used only for the
    same bytes (compared whole: another folder at the same domain position, in another stream of the process, is
    decoded again and replaces the entry). What :meth:`pixels` returns is therefore what decoding the bytes gives,
    bit for bit. It holds at most ``max_bytes`` (pixels, JPEG bytes and bookkeeping), dropping the least recently
    used entries beyond; 0 keeps nothing (every image decoded every time, as without a memo).
    """

    def __init__(self, size: int, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.size, self.max_bytes = size, max_bytes
        self.entries: OrderedDict[tuple[int, int], tuple[bytes, np.ndarray]] = OrderedDict()
        """(domain, item index) -> (the image's bytes, its read-only (3, S, S) uint8 pixels); least recent first."""
        self.bytes = 0
        self.decoded = 0
        """Images decoded (misses)."""

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = self.decoded = 0

    def pixels(self, key: tuple[int, int], data: bytes) -> np.ndarray:
        """The read-only (3, S, S) uint8 pixels of image ``data`` of item ``key``: decoded (draft mode), resized and
        center-cropped as :func:`shards.transforms.crop_pixels` does. Raises
        :class:`shards.transforms.ImageDecodeError` for bytes that do not decode (not memoized)."""
        entry = self.entries.get(key)
        if entry is not None and entry[0] == data:
            self.entries.move_to_end(key)
            return entry[1]
        pixels_CSS = crop_pixels_chw(decode_image(data, self.size), self.size)
        pixels_CSS.flags.writeable = False  # shared by every batch that holds the item
        self.decoded += 1
        self._keep(key, data, pixels_CSS)
        return pixels_CSS

    def _keep(self, key: tuple[int, int], data: bytes, pixels_CSS: np.ndarray) -> None:
        cost = _cost((data, pixels_CSS))
        if cost > self.max_bytes:
            return
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= _cost(old)
        while self.bytes + cost > self.max_bytes:
            self.bytes -= _cost(self.entries.popitem(last=False)[1])
        self.entries[key] = (data, pixels_CSS)
        self.bytes += cost


def _cost(entry: tuple[bytes, np.ndarray]) -> int:
    return entry[1].nbytes + len(entry[0]) + _ENTRY_OVERHEAD


_pixel_memos: dict[tuple[int, int], PixelMemo] = {}


def pixel_memo(size: int, max_bytes: int) -> PixelMemo:
    """This process's :class:`PixelMemo` for image side ``size`` holding at most ``max_bytes``. A module global, so it
    lasts as long as the process: a DataLoader worker starts with its parent's (fork) and adds what it decodes."""
    key = (size, max_bytes)
    if key not in _pixel_memos:
        _pixel_memos[key] = PixelMemo(size, max_bytes)
    return _pixel_memos[key]
