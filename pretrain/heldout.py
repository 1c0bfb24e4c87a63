"""A split's held-out users: who is ranked, against which target, with which history, and batches of them.

Per user and split (``valid``: history seq[:-2], target seq[-2]; ``test``: history seq[:-1], target seq[-1]), read
from the domain's ``seqs-*.tar`` shards: the history the model reads (its last ``data.stream.max_seq_len`` items,
as in training), every earlier item (masked in the ranking) and the target, in catalog indices
(:func:`held_out_users`); :func:`user_batch` collates them for :mod:`pretrain.ranking`.

Shape legend::

    B users of a batch    L history positions    H a user's earlier items    U rows of an item table
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from shards import schema
from shards.collate import split_example, warn_once
from shards.errors import InputError
from shards.inspect import read_shard
from shards.pipeline import TarErrors
from shards.stream_config import Split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldOut:
    """One user of a split, in catalog indices."""

    user: int
    history: tuple[int, ...]
    """What the model reads: the most recent ``max_seq_len`` items before the target."""
    timestamps: tuple[float, ...] | None
    seen: tuple[int, ...]
    """Every item before the target (masked in the ranking)."""
    target: int


def held_out_users(
    folder: str | Path,
    split: Split,
    max_seq_len: int,
    users: int = 0,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    counts: Counter | None = None,
) -> Iterator[HeldOut]:
    """The users of ``folder``'s split, every ``world``-th from the ``rank``-th: all of them in shard order, or,
    with ``users`` > 0, the first ``users`` in a seeded order of the shards. Samples that break the schema are
    skipped (counted in ``counts['bad_samples']``, logged once), and so is unreadable tar content (a truncated
    shard: ``counts['tar_errors']``)."""
    counts = Counter() if counts is None else counts
    manifest = schema.load_manifest(folder)
    shards = list(manifest.seq_shards)
    if users:
        random.Random(f"momrec-eval-users:{seed}").shuffle(shards)
    taken = 0
    for info in shards:
        path = Path(folder) / info.name
        if not path.is_file():
            raise InputError(f"{path}: listed in the manifest but missing")
        read = 0
        # only item indices are held out: the item images are passed over unextracted
        for raw in read_shard(path, TarErrors([str(path)], counts), lambda name: not schema.is_image_member(name)):
            read += 1
            try:
                seq = schema.decode_seq(raw, images=False, n_items=manifest.n_items, n_users=manifest.n_users)
            except schema.SampleError as e:
                counts["bad_samples"] += 1
                warn_once(log, ("eval-sample", e.shard, e.key), "skipping bad sample: %s", e)
                continue
            if taken % world == rank:
                yield _held_out(seq, split, max_seq_len)
            taken += 1
            if taken == users:
                return
        if read < info.samples:  # tar reads a damaged header as the end of the archive: no error, fewer samples
            counts["missing_samples"] += info.samples - read
            warn_once(log, ("eval-short", str(path)), "%s: %d of the %d samples the manifest lists were read",
                      path, read, info.samples)  # fmt: skip


def _held_out(seq: schema.Sequence, split: Split, max_seq_len: int) -> HeldOut:
    index = [item.index for item in seq.items]
    model_in = split_example(0, seq, split, max_seq_len)
    everything = split_example(0, seq, split, len(seq.seq))
    return HeldOut(
        user=seq.index,
        history=tuple(index[p] for p in model_in.history),
        timestamps=model_in.timestamps,
        seen=tuple(index[p] for p in everything.history),
        target=index[model_in.target],
    )


@dataclass
class UserBatch:
    """Users to rank for: the sequence fields ``Recommender.user_vectors`` reads of a :class:`shards.collate.Batch`
    (over an item table of catalog rows), with their targets and earlier items::

        item_rows    (U,)    long    catalog index of each row of the item table
        seq          (B, L)  long    rows of the item table, chronological, right-padded with -1
        seq_mask     (B, L)  bool
        timestamps   (B, L)  double  nan where unknown or padded
        user_index   (B,)    long
        target_item  (B,)    long    catalog index of the held-out item
        seen         (B, H)  long    catalog indices of every earlier item, -1 padded
    """

    item_rows: torch.Tensor
    seq: torch.Tensor
    seq_mask: torch.Tensor
    timestamps: torch.Tensor
    user_index: torch.Tensor
    target_item: torch.Tensor
    seen: torch.Tensor

    def __len__(self) -> int:
        return self.seq.shape[0]


def padded(rows: Sequence[Sequence[float]], fill: float, dtype: torch.dtype) -> torch.Tensor:
    """(len(rows), the longest row or 1) of ``dtype``: the rows, right-padded with ``fill``."""
    out = torch.full((len(rows), max(1, max(len(r) for r in rows))), fill, dtype=dtype)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def user_batch(users: Sequence[HeldOut], device: torch.device | str = "cpu") -> UserBatch:
    """Collate held-out users (their histories over a table of the distinct items)."""
    history_BL = padded([u.history for u in users], -1, torch.long)
    mask_BL = history_BL >= 0
    item_rows_U, inverse = torch.unique(history_BL[mask_BL], return_inverse=True)
    seq_BL = torch.full_like(history_BL, -1)
    seq_BL[mask_BL] = inverse
    stamps = [u.timestamps or [math.nan] * len(u.history) for u in users]
    return UserBatch(
        item_rows=item_rows_U.to(device),
        seq=seq_BL.to(device),
        seq_mask=mask_BL.to(device),
        timestamps=padded(stamps, math.nan, torch.float64).to(device),
        user_index=torch.tensor([u.user for u in users], dtype=torch.long, device=device),
        target_item=torch.tensor([u.target for u in users], dtype=torch.long, device=device),
        seen=padded([u.seen for u in users], -1, torch.long).to(device),
    )
