"""One DataLoader worker's pipeline: its planned sample ranges of the sequence shards -> decoded, split, collated
batches, topped up when bad samples left it short of its planned number.

::

    its sample ranges -> raw samples -> seeded shuffle -> decode (schema.decode_seq) -> [resume skip]
        -> split/truncate -> batch + collate -> its planned number of batches (topping up if samples were bad)

:class:`RankBatches` is what one rank's DataLoader iterates (:class:`shards.stream.SequenceStream` makes it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from shards import schema
from shards.collate import Batch, Collator, Example, split_example, warn_once
from shards.plan import EpochPlan, RegroupedPlan, ShardRef, ShardSlice, drop_batches, make_plan
from shards.stream_config import Split, StreamConfig
from shards.tarread import tar_samples

log = logging.getLogger(__name__)


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
    samples = tar_samples(piece.url, handler, selected)
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


class Position:
    """Where a rank's persistent DataLoader workers start their next pass: the epoch and the batches of it already
    handed over, in shared memory. The training process sets it before each ``iter(loader)``; each worker reads it
    when the DataLoader (re)starts its iteration, and makes the epoch's plan itself (a pure function of the shards
    and the epoch: :func:`shards.plan.make_plan`), so workers forked once serve every epoch."""

    def __init__(self, shards: Sequence[ShardRef], world_size: int, cfg: StreamConfig) -> None:
        self.shards, self.world_size, self.cfg = shards, world_size, cfg
        self.shared = torch.zeros(2, dtype=torch.long).share_memory_()
        self._plan: EpochPlan | None = None

    def set(self, epoch: int, start: int) -> None:
        self.shared[0], self.shared[1] = epoch, start

    def now(self) -> tuple[EpochPlan, int]:
        epoch, start = (int(x) for x in self.shared)
        if self._plan is None or self._plan.epoch != epoch:
            self._plan = make_plan(self.shards, epoch, self.world_size, self.cfg.num_workers, self.cfg)
        return self._plan, start


class RankBatches(IterableDataset):
    """What the DataLoader of one rank iterates: each worker builds and runs the pipeline of its own slot, of one
    ``plan`` from batch ``start`` on, or, for persistent workers, of where ``position`` says at each pass."""

    def __init__(
        self,
        plan: EpochPlan | Position,
        rank: int,
        cfg: StreamConfig,
        shards: Sequence[ShardRef],
        sizes: Sequence[DomainSize],
        start: int = 0,
    ) -> None:
        super().__init__()
        self.plan, self.rank, self.cfg, self.shards, self.sizes, self.start = plan, rank, cfg, shards, sizes, start

    def __iter__(self) -> Iterator[Batch]:
        plan, start = self.plan.now() if isinstance(self.plan, Position) else (self.plan, self.start)
        info = get_worker_info()
        n_slots = len(plan.worker_batches[self.rank])
        # A DataLoader takes batches from its workers round-robin starting at worker 0; a resumed one must
        # start with the planned worker ("slot") whose batch comes next, so its worker i plays slot first + i.
        first = plan.worker_of(self.rank, start)
        slot = (first + (0 if info is None else info.id)) % n_slots
        planned = plan.worker_batches[self.rank][slot]
        skip = plan.batches_before(self.rank, start)[slot]
        if planned == skip:
            return iter(())
        if isinstance(plan, RegroupedPlan):  # ranges of the first plan's slots, each by that slot's pipeline
            ranges = drop_batches(plan.slots[self.rank][slot], skip)
            return itertools.chain.from_iterable(self._pipeline(plan.base, r.rank, r.worker, r.stop, r.start)
                                                 for r in ranges)  # fmt: skip
        return iter(self._pipeline(plan, self.rank, slot, planned, skip))

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
