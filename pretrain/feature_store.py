"""The disk store under the frozen-bottom cache: what a frozen bottom computes for an item is written once, and
read back by later processes (runs, validations, ``python -m pretrain.evaluate``, ``python -m finetune``, every cell
of a scaling study) instead of being recomputed.

Layout::

    <root>/                                    model.feature_cache_dir (see :func:`feature_dir`)
      <entry>/                                 one frozen bottom on one domain's items: 32 hex digits of its key
        entry.json                             what the key was made of (for ``python -m pretrain.cache list``)
        seg-r<rank>-<pid>-<random>.safetensors items computed by one writer: tensor ``i<index>`` per catalog item
        .tmp-...                               a write in progress, or one killed before its rename: never read

An entry's key is the sha256 of the *bottom key* (the exact bytes of the frozen stages' parameters and buffers, the
split, the model class and config, the torch and transformers versions, the device type: see
``pretrain.backbone.bottom_key``) and the *source key* (:class:`Source`: the domain's items shards by their
sha256, and the preprocessing: the tokenizer's full definition and max_text_len, or the image size, mean, std,
PIL version and ``shards.transforms.TRANSFORM_VERSION``). Whatever changes the bottom's output makes a new entry;
nothing is ever rewritten in place.

A segment is written under a temporary name in its entry folder (``O_EXCL``), fsynced and renamed into place
(``os.replace``). Its safetensors metadata holds the sha256 of the whole file, computed with that field zeroed, so
a truncated or bit-flipped segment is detected when read: it is logged, deleted, and its items are recomputed. Each
writer owns its segment names (rank, process id, random suffix), so ranks never write the same file; an item stored
twice is harmless. The stored tensors are the in-memory cache's exact values (text: the item's own token states,
padding cut), so results are bit-identical with and without the store.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shards import schema
from shards.stream_config import StreamConfig
from shards.subset import catalog_id

from .feature_files import (
    ENTRY_FILE,
    FORMAT,
    SEGMENT_GLOB,
    CorruptSegment,
    Segment,
    checksummed,
    read_segment,
    segment_items,
    write_atomic,
)

log = logging.getLogger(__name__)

ENV = "MOMREC_CACHE"
"""Root of momrec's caches; the feature store is its ``features`` folder (default root: ~/.cache/momrec)."""
SEGMENT_BYTES = 64 << 20
"""Pending items are written as a segment once they hold this many bytes (and at every flush)."""
RECENT_BYTES = 4 * SEGMENT_BYTES
"""An entry keeps the segments it read last, up to this many bytes (and always the last one), so a reader that
takes a segment's items a chunk at a time (a catalog pass; segments written by several ranks interleave) reads and
checks each once; :meth:`DiskCache.release` frees them."""


def feature_dir(setting: str) -> Path | None:
    """The store's folder for ``model.feature_cache_dir``: None for 'none' (no disk store); '' for
    ``$MOMREC_CACHE/features``, or ``~/.cache/momrec/features`` when MOMREC_CACHE is unset; else the path given."""
    if setting.strip().lower() == "none":
        return None
    if setting:
        return Path(setting).expanduser()
    root = os.environ.get(ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "momrec") / "features"


def digest_of(*parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ---- sources: a domain's items and their preprocessing ----------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """What a tower's inputs for one domain depend on, besides the model: ``digest`` keys the entry, ``summary``
    is shown by ``list``."""

    digest: str
    summary: dict[str, Any]


@functools.lru_cache(maxsize=8)
def tokenizer_digest(name: str) -> str:
    """sha256 of the tokenizer's full definition (a fast tokenizer's JSON: vocabulary, normalizer with its
    lower-casing, special tokens), else of its vocabulary and init arguments."""
    from shards.tokens import load_tokenizer

    tok = load_tokenizer(name)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return digest_of(type(tok).__name__, backend.to_str())
    return digest_of(type(tok).__name__, sorted(tok.get_vocab().items()), tok.init_kwargs)


def _items_summary(folder: str | Path) -> dict[str, Any]:
    manifest = schema.load_manifest(folder)
    return {"domain": manifest.domain, "n_items": manifest.n_items, "items": catalog_id(folder)}


def text_source(folder: str | Path, cfg: StreamConfig) -> Source:
    """The text tower's source for ``folder``: its items shards, the tokenizer and max_text_len."""
    summary = {**_items_summary(folder), "tokenizer": Path(cfg.text_model).name, "max_text_len": cfg.max_text_len}
    return Source(digest_of("text", summary, tokenizer_digest(cfg.text_model)), summary)


def image_source(folder: str | Path, cfg: StreamConfig) -> Source:
    """The image tower's source for ``folder``: its items shards and the image transform."""
    import PIL

    from shards.transforms import TRANSFORM_VERSION

    summary = {**_items_summary(folder), "image_size": cfg.image_size, "mean": list(cfg.image_mean),
               "std": list(cfg.image_std), "pil": PIL.__version__, "transform": TRANSFORM_VERSION}  # fmt: skip
    return Source(digest_of("image", summary), summary)


# ---- one entry ------------------------------------------------------------------------------------------------


class Entry:
    """One frozen bottom on one domain's items: the segments of ``folder`` (read) and the items computed in this
    process but not written yet (``pending``)."""

    def __init__(self, root: Path, key: str, summary: dict[str, Any]) -> None:
        self.key, self.summary = key, summary
        self.folder = root / key[:32]
        self.index: dict[int, Path] = {}
        self.scanned: set[str] = set()
        self.folder_mtime = -1
        self.pending: dict[int, torch.Tensor] = {}
        self.pending_bytes = 0
        self.recent: OrderedDict[Path, Segment] = OrderedDict()
        """The segments read last, checked, oldest first (:meth:`_segment`)."""
        self.writable = True
        self.touched = False

    def scan(self) -> None:
        """Index the segments that appeared since the last scan (cheap when the folder did not change)."""
        try:
            mtime = self.folder.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self.folder_mtime:
            return
        self.folder_mtime = mtime
        for path in sorted(self.folder.glob(SEGMENT_GLOB)):
            if path.name in self.scanned:
                continue
            try:
                items = segment_items(path)
            except (OSError, CorruptSegment) as e:
                self._discard(path, e)
                continue
            self.scanned.add(path.name)
            self.index.update(dict.fromkeys(items, path))
        self._touch()

    def load(self, wanted: Iterable[int], whole: bool = True) -> dict[int, torch.Tensor]:
        """The items of ``wanted`` that the segments hold, and with ``whole`` every other item of the segments read
        (likely wanted soon). Without ``whole`` a segment read is kept among the last ones read (:meth:`_segment`),
        so a reader that wants its items a chunk at a time reads and checks it once (then calls :meth:`release`).
        Corrupt segments are deleted and their items left out."""
        wanted = list(wanted)
        if any(i not in self.index for i in wanted):
            self.scan()
        by_path: dict[Path, list[int]] = {}
        for i in wanted:
            if i in self.index:
                by_path.setdefault(self.index[i], []).append(i)
        out: dict[int, torch.Tensor] = {}
        for path, items in sorted(by_path.items()):
            try:
                segment = self._segment(path, keep=not whole)
            except FileNotFoundError:  # pruned since the scan
                self._forget(path)
                continue
            except (OSError, CorruptSegment) as e:
                self._discard(path, e)
                continue
            out.update({i: segment.tensor(i) for i in (segment.items() if whole else items) if i in segment.spans})
        return out

    def _segment(self, path: Path, keep: bool) -> Segment:
        """The segment at ``path``, from the ones kept (at most RECENT_BYTES of them, always the last) or read and
        checked now (and kept if ``keep``)."""
        kept = self.recent.pop(path, None)
        segment = kept or read_segment(path, self.key)
        if not keep and kept is None:
            return segment
        self.recent[path] = segment  # the most recent last
        while len(self.recent) > 1 and sum(s.nbytes for s in self.recent.values()) > RECENT_BYTES:
            self.recent.popitem(last=False)
        return segment

    def release(self) -> None:
        """Forget the segments kept from the last reads (their memory)."""
        self.recent.clear()

    def add(self, index: int, x: torch.Tensor) -> None:
        if self.writable and index not in self.index:
            self.pending[index] = x.detach().to("cpu")
            self.pending_bytes += x.numel() * x.element_size()

    def flush(self) -> int:
        """Write the pending items as one segment; returns how many. A write that fails is logged and the entry
        becomes read-only for this process (a cache never stops a run)."""
        items, self.pending, self.pending_bytes = self.pending, {}, 0
        if not items or not self.writable:
            return 0
        tensors = {f"i{i}": x.contiguous() for i, x in sorted(items.items())}
        name = f"seg-r{os.environ.get('RANK', '0')}-{os.getpid()}-{uuid.uuid4().hex[:12]}.safetensors"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not (self.folder / ENTRY_FILE).is_file():
                doc = {"format": FORMAT, "key": self.key, **self.summary, "created": time.time()}
                write_atomic(self.folder, ENTRY_FILE, json.dumps(doc, indent=2, default=str).encode())
            path = write_atomic(self.folder, name, checksummed(tensors, {"format": FORMAT, "entry": self.key}))
        except OSError as e:
            log.warning("feature cache %s: not writable, items stay in memory only: %s", self.folder, e)
            self.writable = False
            return 0
        self.scanned.add(name)
        self.index.update(dict.fromkeys(items, path))
        return len(items)

    def _discard(self, path: Path, problem: Exception) -> None:
        log.warning("feature cache: %s is corrupt (%s): deleted, its items will be recomputed", path, problem)
        path.unlink(missing_ok=True)
        self._forget(path)

    def _forget(self, path: Path) -> None:
        self.recent.pop(path, None)
        self.scanned.discard(path.name)
        self.index = {i: p for i, p in self.index.items() if p != path}

    def _touch(self) -> None:
        """Mark the entry used (``list`` shows it; ``prune --older-than`` keeps it), once per process."""
        if not self.touched:
            self.touched = True
            try:
                os.utime(self.folder / ENTRY_FILE)
            except OSError:
                pass


# ---- one tower's store ----------------------------------------------------------------------------------------


class DiskCache:
    """The disk store of one tower's frozen bottom: domain index -> :class:`Entry`, for the domains whose items
    source was bound (:meth:`bind`; a domain without one is cached in memory only). The backbone sets the bottom
    key (:meth:`reset`) for each generation of its in-memory cache, and flushes before anything changes."""

    def __init__(self, root: Path, tower: str) -> None:
        self.root, self.tower = root, tower
        self.sources: dict[int, Source] = {}
        self.entries: dict[int, Entry] = {}
        self.bottom: tuple[str, dict[str, Any]] | None = None
        """(key, summary) of the frozen bottom; None: not known (not computed yet, or unhashable)."""
        self.generation = self.split = -1
        self.loaded = self.written = 0
        """Items read from disk, and written to it, by this process."""

    def bind(self, domain: int, source: Source) -> bool:
        """Domain ``domain``'s items come from ``source``; True if that changed (the caller flushed first)."""
        if self.sources.get(domain) == source:
            return False
        self.sources[domain] = source
        self.entries.pop(domain, None)
        return True

    def reset(self, generation: int, split: int, bottom: tuple[str, dict[str, Any]] | None) -> None:
        """A new bottom (the caller flushed the previous one's pending items)."""
        self.entries.clear()
        self.generation, self.split, self.bottom = generation, split, bottom

    def entry(self, domain: int) -> Entry | None:
        if self.bottom is None or domain not in self.sources:
            return None
        if domain not in self.entries:
            source = self.sources[domain]
            summary = {"tower": self.tower, "bottom": self.bottom[1], "source": source.summary}
            self.entries[domain] = Entry(self.root, digest_of(self.bottom[0], source.digest), summary)
        return self.entries[domain]

    def load(self, keys: Iterable[tuple[int, int]], whole: bool = True) -> dict[tuple[int, int], torch.Tensor]:
        """What the disk holds for ``keys`` ``(domain, item_index)``, plus (``whole``) the other items of the
        segments read."""
        by_domain: dict[int, list[int]] = {}
        for domain, index in keys:
            by_domain.setdefault(domain, []).append(index)
        out: dict[tuple[int, int], torch.Tensor] = {}
        for domain, indices in by_domain.items():
            entry = self.entry(domain)
            if entry is not None:
                found = entry.load(indices, whole)
                self.loaded += sum(i in found for i in indices)
                out.update({(domain, i): x for i, x in found.items()})
        return out

    def add(self, key: tuple[int, int], x: torch.Tensor) -> None:
        """Queue a computed item for writing (ignored for a domain without a source)."""
        entry = self.entry(key[0])
        if entry is not None:
            entry.add(key[1], x)

    def release(self) -> None:
        """Forget the segments the entries kept from their last reads (:data:`RECENT_BYTES`)."""
        for entry in self.entries.values():
            entry.release()

    @property
    def pending_bytes(self) -> int:
        return sum(e.pending_bytes for e in self.entries.values())

    def flush(self, bottom_now: Callable[[], str | None]) -> int:
        """Write every entry's pending items if the frozen bottom's key is still the one they were computed under
        (``bottom_now()`` recomputes it from the weights): items from weights that drifted are dropped, never
        stored under a wrong key. Returns the items written."""
        pending = sum(len(e.pending) for e in self.entries.values())
        if not pending:
            return 0
        if self.bottom is None or bottom_now() != self.bottom[0]:
            log.warning("feature cache: the frozen %s weights changed: %d computed items not written", self.tower,
                        pending)  # fmt: skip
            for e in self.entries.values():
                e.pending, e.pending_bytes = {}, 0
            return 0
        written = sum(e.flush() for e in self.entries.values())
        self.written += written
        return written
