"""The training input: built domain folders -> equal-length, resumable streams of batches on every rank.

Per epoch, an :class:`~shards.plan.EpochPlan` cuts the ``seqs-*.tar`` shards of all folders, laid end to end,
into runs of sample ranges, one per (rank, worker) slot, and fixes how many batches every worker yields, so
every rank yields exactly ``len(stream)`` batches (a rank with more batches would hang the job in a
collective). Each DataLoader worker runs the pipeline of its slot (:mod:`shards.pipeline`); splits and collation
live in :mod:`shards.collate`, the plan in :mod:`shards.plan`, the config in :mod:`shards.stream_config`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from shards import schema
from shards.collate import Batch
from shards.pipeline import DomainSize, Position, RankBatches
from shards.plan import PLAN_VERSION, BatchRange, EpochPlan, RegroupedPlan, ShardRef, make_plan, regroup, rest_of_epoch
from shards.stream_config import StreamConfig
from shards.tokens import load_tokenizer

log = logging.getLogger(__name__)

STATS = ("bad_samples", "bad_images", "empty_texts", "tar_errors", "topup_passes", "missing_samples", "extra_samples")
"""The counters of :attr:`SequenceStream.stats`: samples skipped as breaking the schema, images dropped as
undecodable, item texts taken as none for being empty, unreadable tar content (a truncated shard counts once per
level that meets it), extra passes over a worker's samples to make up for the bad ones, samples the manifest
promises that a shard did not deliver (cut or damaged: a bad tar header silently ends the archive), and samples a
shard holds beyond the manifest's count (which the stream never reads). Missing and extra samples are counted once
per epoch (top-up passes re-read the same ranges), or per draw when resampled."""


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
        self._sizes = [DomainSize(m.n_items, m.n_users) for m in self.manifests]
        self._position: Position | None = None
        self._loader: DataLoader | None = None
        """The DataLoader of persistent workers (``cfg.persistent_workers``), made at the first pass with its
        ``_position``."""

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
        for batch in self._loader_for(plan):
            self.batches_done += 1
            self.stats.update(batch.stats)
            yield batch
        if self.batches_done != plan.batches:
            raise RuntimeError(f"rank {self.rank} got {self.batches_done} batches, planned {plan.batches}")

    def _loader_for(self, plan: EpochPlan) -> DataLoader:
        """The DataLoader of this pass: the persistent one, told where to start (workers forked at the first pass
        serve every epoch, keeping their token and pixel memos), or, without persistent workers or for a regrouped
        epoch (whose plan the workers cannot make themselves), one whose new workers run this plan alone."""
        cfg = self.cfg
        if not (cfg.persistent_workers and cfg.num_workers) or isinstance(plan, RegroupedPlan):
            dataset = RankBatches(plan, self.rank, cfg, self.shards, self._sizes, self.batches_done)
            return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers)
        if self._loader is None:
            self._position = Position(self.shards, self.world_size, cfg)
            dataset = RankBatches(self._position, self.rank, cfg, self.shards, self._sizes)
            self._loader = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, persistent_workers=True)
        self._position.set(plan.epoch, self.batches_done)  # before iter(): a (re)started worker reads it
        return self._loader

    def worker_pids(self) -> list[int]:
        """Process ids of the persistent workers running now (none before the first pass, or after :meth:`close`)."""
        iterator = None if self._loader is None else self._loader._iterator
        return [] if iterator is None else [w.pid for w in iterator._workers]

    def close(self) -> None:
        """Stop the persistent workers now (they also stop when the stream is garbage-collected); a later iteration
        starts new ones."""
        if self._loader is not None and self._loader._iterator is not None:
            self._loader._iterator._shutdown_workers()
        self._loader = self._position = None

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
