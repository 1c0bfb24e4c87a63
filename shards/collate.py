"""Sequence samples -> training batches: leave-one-out splits, and collation over a table of distinct items
(also of catalog items alone, :func:`collate_items`, to encode a domain's whole catalog).

Runs in the DataLoader workers. Shape legend::

    B  sequences in the batch            L  longest history in the batch (<= max_seq_len)
    U  distinct items of the batch       T  longest tokenized text of the batch (<= max_text_len)
    N  distinct items with a decoded image (U_img)                  S  image side
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shards import schema
from shards.pixel_memo import pixel_memo
from shards.stream_config import Split, StreamConfig
from shards.tokens import token_memo
from shards.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageDecodeError, normalize_pixels, stack_pixels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One user's sequence cut for a split: a history and, for valid/test, a target."""

    domain: int
    user_index: int
    items: tuple[schema.Item, ...]
    """The sequence's distinct items (content), as in the shard."""
    history: tuple[int, ...]
    """Chronological positions into ``items``, at most max_seq_len, the most recent kept."""
    timestamps: tuple[float, ...] | None
    """One per history position, or None when the source has no time."""
    target: int | None
    """Position into ``items`` of the item to predict (valid/test), None for train."""
    source: str = ""
    """Where the sample came from (``shard: sample 'key'``), named in warnings about its content."""


def split_example(domain: int, seq: schema.Sequence, split: Split, max_seq_len: int, source: str = "") -> Example:
    """Leave-one-out: train seq[:-2]; valid seq[:-2] -> seq[-2]; test seq[:-1] -> seq[-1]."""
    end = len(seq.seq) - (1 if split == "test" else 2)
    start = max(0, end - max_seq_len)
    target = None if split == "train" else seq.seq[end]
    stamps = None if seq.timestamps is None else seq.timestamps[start:end]
    return Example(domain, seq.index, seq.items, seq.seq[start:end], stamps, target, source)


# ---- collation ------------------------------------------------------------------------------------


def _imagenet_mean() -> torch.Tensor:
    return torch.tensor(IMAGENET_MEAN, dtype=torch.float32)


def _imagenet_std() -> torch.Tensor:
    return torch.tensor(IMAGENET_STD, dtype=torch.float32)


class _Tensors:
    """``to`` and ``normalized_pixels`` of the dataclasses with an item table (:class:`ItemTable`, :class:`Batch`)."""

    pixel_values: torch.Tensor
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Any:
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    def normalized_pixels(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, 3, S, S) ``(pixel_values / 255 - pixel_mean) / pixel_std`` in ``dtype``, where the pixels are."""
        return normalize_pixels(self.pixel_values, self.pixel_mean, self.pixel_std, dtype)


@dataclass
class ItemTable(_Tensors):
    """Distinct items without sequences: the item-table fields of :class:`Batch` (documented there), e.g. a chunk
    of a domain's catalog to encode (:func:`collate_items`)."""

    item_domain: torch.Tensor
    item_index: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    has_text: torch.Tensor
    pixel_values: torch.Tensor
    image_row: torch.Tensor
    has_image: torch.Tensor
    pixel_mean: torch.Tensor = field(default_factory=_imagenet_mean)
    pixel_std: torch.Tensor = field(default_factory=_imagenet_std)

    def __len__(self) -> int:
        return self.item_index.shape[0]

    def fields(self) -> dict[str, torch.Tensor]:
        """The tensors by field name (not copied)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class Batch(_Tensors):
    """A batch of histories over a table of its distinct items, each item encoded once per step.

    Tensors (B sequences, L history positions, U distinct items, T tokens, N items with an image, S image side)::

        item_domain     (U,)          long   domain of each distinct item (position of its folder)
        item_index      (U,)          long   catalog index within its domain (ID embeddings, popularity)
        input_ids       (U, T)        long   item texts, tokenized once per process (TokenMemo), padded to the longest
        attention_mask  (U, T)        long
        has_text        (U,)          bool   False: the item has no text (its row is an empty string)
        pixel_values    (N, 3, S, S)  uint8  images of the items that have one: resized, cropped, not normalized
        image_row       (U,)          long   row in pixel_values, -1 without image
        has_image       (U,)          bool
        seq             (B, L)        long   rows of the item table, chronological, right-padded with -1
        seq_mask        (B, L)        bool   True at real positions
        timestamps      (B, L)        double unix seconds, nan where unknown or padded (float32 would round to minutes)
        user_domain     (B,)          long
        user_index      (B,)          long
        target          (B,)          long   row of the item to predict (valid/test; None for train)
        pixel_mean      (3,)          float  the stream's per-channel mean and standard deviation of pixels in [0, 1],
        pixel_std       (3,)          float  used by normalized_pixels()

    Pixels stay uint8 until the training step: after ``batch.to(device)``, ``batch.normalized_pixels(dtype)``
    gives the encoder's input on the device (a quarter of the bytes of float32 cross the worker IPC and the
    host-to-device copy).

    ``stats`` counts events in the producing worker since its previous batch (bad samples, images, tar errors).
    """

    item_domain: torch.Tensor
    item_index: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    has_text: torch.Tensor
    pixel_values: torch.Tensor
    image_row: torch.Tensor
    has_image: torch.Tensor
    seq: torch.Tensor
    seq_mask: torch.Tensor
    timestamps: torch.Tensor
    user_domain: torch.Tensor
    user_index: torch.Tensor
    target: torch.Tensor | None = None
    pixel_mean: torch.Tensor = field(default_factory=_imagenet_mean)
    pixel_std: torch.Tensor = field(default_factory=_imagenet_std)
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.seq.shape[0]


_logged: set[tuple] = set()


def warn_once(logger: logging.Logger, key: tuple, msg: str, *args: Any) -> None:
    """Log a warning the first time ``key`` is met in this process (a top-up pass meets bad data again)."""
    if key not in _logged:
        _logged.add(key)
        logger.warning(msg, *args)


@dataclass(frozen=True)
class Held:
    """Items whose encoder inputs need not be prepared, as the model already holds their frozen-bottom outputs
    (:meth:`pretrain.backbone.Backbone.held`), keyed by ``(domain, item index)``. Their texts are not tokenized and
    their images not decoded: their rows of ``input_ids`` are padding ids (the attention mask is the real one, from
    the token count) and of ``pixel_values`` zeros. Those placeholders must never be encoded: the model's cache
    refuses an item it no longer holds (``pretrain.frozen_cache.FrozenCache.placeholders``)."""

    text_tokens: Mapping[tuple[int, int], int] = field(default_factory=dict)
    """Token count of each held text (its attention-mask row)."""
    images: AbstractSet[tuple[int, int]] = frozenset()
    """Items with a held image (one that decoded when its features were computed, so it decodes now)."""


class Collator:
    """Examples -> :class:`Batch`. Runs in the DataLoader workers.

    ``flip_key`` seeds the image flips (when ``cfg.augment`` on the train split) of batch number n of a
    worker from (flip_key, n), so a resumed stream that never collated the skipped batches flips the same.
    """

    def __init__(
        self, cfg: StreamConfig, counts: Counter | None = None, flip_key: str = "", first_batch: int = 0
    ) -> None:
        self.cfg = cfg
        self.counts = Counter() if counts is None else counts
        self.flip_key = flip_key
        self.batch_number = first_batch
        self.sources: dict[tuple[int, int], str] = {}
        """(domain, item index) -> the source of the first example of the batch holding it (for warnings)."""

    def __call__(self, examples: Sequence[Example]) -> Batch:
        flip_rng = None
        if self.cfg.augment and self.cfg.split == "train":
            flip_rng = random.Random(f"momrec-flip:{self.flip_key}:{self.batch_number}")
        self.batch_number += 1
        rows: dict[tuple[int, int], int] = {}
        table: list[tuple[int, schema.Item]] = []
        histories = [[_row(rows, table, ex.domain, ex.items[p]) for p in ex.history] for ex in examples]
        self.sources = {(ex.domain, it.index): ex.source for ex in reversed(examples) for it in ex.items}
        targets = [_row(rows, table, ex.domain, ex.items[ex.target]) for ex in examples if ex.target is not None]
        seq_BL, seq_mask_BL, timestamps_BL = _pad_histories(examples, histories)
        batch = Batch(
            **self.item_table(table, flip_rng).fields(),
            seq=seq_BL,
            seq_mask=seq_mask_BL,
            timestamps=timestamps_BL,
            user_domain=torch.tensor([ex.domain for ex in examples], dtype=torch.long),
            user_index=torch.tensor([ex.user_index for ex in examples], dtype=torch.long),
            target=torch.tensor(targets, dtype=torch.long) if targets else None,
        )
        batch.stats = dict(self.counts)
        self.counts.clear()
        return batch

    def item_table(
        self, table: Sequence[tuple[int, schema.Item]], flip_rng: random.Random | None = None, held: Held | None = None
    ) -> ItemTable:
        """(domain, item) pairs -> their :class:`ItemTable`: texts tokenized (:class:`TokenMemo`), images decoded (an
        undecodable image is counted in ``counts['bad_images']`` and the item kept without it); except the inputs of
        the ``held`` items, which are placeholders (:class:`Held`)."""
        held = held or Held()
        return ItemTable(
            item_domain=torch.tensor([d for d, _ in table], dtype=torch.long),
            item_index=torch.tensor([it.index for _, it in table], dtype=torch.long),
            **self._texts(table, held),
            **self._images(table, flip_rng, held),
        )

    def _texts(self, table: Sequence[tuple[int, schema.Item]], held: Held) -> dict[str, torch.Tensor]:
        if not self.cfg.item_content:  # ID-only model: no text is read
            empty = torch.zeros((len(table), 0), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty, "has_text": torch.zeros(len(table), dtype=torch.bool)}
        memo = token_memo(self.cfg.text_model, self.cfg.max_text_len)
        input_ids_UT, attention_mask_UT = memo.encode(table, held.text_tokens)
        has_text_U = torch.tensor([it.text is not None for _, it in table], dtype=torch.bool)
        return {"input_ids": input_ids_UT, "attention_mask": attention_mask_UT, "has_text": has_text_U}

    def _images(self, table: Sequence[tuple[int, schema.Item]], flip_rng: random.Random | None, held: Held) -> dict:
        cfg = self.cfg
        memo = pixel_memo(cfg.image_size, cfg.image_memo_mb << 20)
        rows: list[np.ndarray | None] = []  # None: a held image's placeholder, a row of zeros (not decoded)
        image_row_U = torch.full((len(table),), -1, dtype=torch.long)
        for u, (domain, item) in enumerate(table):
            if item.image is None or not cfg.item_content:
                continue
            pixels_CSS = None
            if (domain, item.index) not in held.images:
                try:
                    pixels_CSS = memo.pixels((domain, item.index), item.image)
                except ImageDecodeError as e:
                    self.counts["bad_images"] += 1
                    where = self.sources.get((domain, item.index)) or "?"
                    warn_once(log, ("image", domain, item.index), "domain %d item %d (%s): image dropped, the item "
                              "kept without it: %s", domain, item.index, where, e)  # fmt: skip
                    continue
            image_row_U[u] = len(rows)
            rows.append(pixels_CSS)
        # one draw per decoded image, in order (placeholders draw none)
        flips = [pixels is not None and flip_rng is not None and flip_rng.random() < 0.5 for pixels in rows]
        return {
            "pixel_values": stack_pixels(rows, cfg.image_size, flips),
            "pixel_mean": torch.tensor(cfg.image_mean, dtype=torch.float32),
            "pixel_std": torch.tensor(cfg.image_std, dtype=torch.float32),
            "image_row": image_row_U,
            "has_image": image_row_U >= 0,
        }


def collate_items(
    items: Sequence[tuple[int, schema.Item]], cfg: StreamConfig, counts: Counter | None = None, held: Held | None = None
) -> ItemTable:
    """The :class:`ItemTable` of (domain, item) pairs, tokenized and transformed as the stream does (never
    flipped): e.g. a chunk of a domain's catalog read from its ``items-*.tar`` shards, to encode for ranking.
    ``held``: items whose inputs are left as placeholders (:class:`Held`); every other field is as without it."""
    if not items:
        raise ValueError("collate_items needs at least one item")
    return Collator(cfg, counts).item_table(items, held=held)


def _row(rows: dict[tuple[int, int], int], table: list, domain: int, item: schema.Item) -> int:
    key = (domain, item.index)
    if key not in rows:
        rows[key] = len(table)
        table.append((domain, item))
    return rows[key]


def _pad_histories(
    examples: Sequence[Example], histories: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, L = len(examples), max(len(h) for h in histories)
    seq_BL = torch.full((B, L), -1, dtype=torch.long)
    timestamps_BL = torch.full((B, L), float("nan"), dtype=torch.float64)
    for b, (ex, rows) in enumerate(zip(examples, histories)):
        seq_BL[b, : len(rows)] = torch.tensor(rows, dtype=torch.long)
        if ex.timestamps is not None:
            timestamps_BL[b, : len(rows)] = torch.tensor(ex.timestamps, dtype=torch.float64)
    return seq_BL, seq_BL >= 0, timestamps_BL
