"""Listing and pruning the feature store's entries (what ``python -m pretrain.cache list|prune`` shows and removes):
entries last used long ago, and the temporary files of killed writers."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .feature_files import ENTRY_FILE, SEGMENT_GLOB, TMP_PREFIX, CorruptSegment, segment_items

STALE_TMP_S = 3600.0
"""A temporary file older than this is a killed writer's: prune removes it."""


@dataclass(frozen=True)
class EntryInfo:
    """One entry folder as ``list`` shows it."""

    folder: Path
    summary: dict[str, Any]
    """entry.json ({} when missing or unreadable)."""
    segments: int
    items: int
    """Distinct items over the segments' headers."""
    bytes: int
    last_used: float
    """Newest modification time of entry.json (touched at each use) and the segments."""


def is_entry_folder(path: Path) -> bool:
    """A folder named like an entry (32 hex digits): the only folders prune removes."""
    return path.is_dir() and len(path.name) == 32 and all(c in "0123456789abcdef" for c in path.name)


def entry_info(folder: Path) -> EntryInfo:
    try:
        summary = json.loads((folder / ENTRY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    items: set[int] = set()
    segments = size = 0
    last = 0.0
    for path in folder.iterdir():
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed by a reader or writer meanwhile
            continue
        size += stat.st_size
        if path.name == ENTRY_FILE or path.match(SEGMENT_GLOB):
            last = max(last, stat.st_mtime)
        if path.match(SEGMENT_GLOB):
            segments += 1
            try:
                items.update(segment_items(path))
            except (OSError, CorruptSegment):
                pass  # counted in the size; a reader deletes it
    return EntryInfo(folder, summary if isinstance(summary, dict) else {}, segments, len(items), size, last)


def list_entries(root: Path) -> list[EntryInfo]:
    """The entries under ``root``, most recently used first."""
    if not root.is_dir():
        return []
    infos = [entry_info(p) for p in root.iterdir() if is_entry_folder(p)]
    return sorted(infos, key=lambda info: -info.last_used)


def prune(root: Path, older_than_s: float | None, now: float | None = None) -> tuple[list[EntryInfo], int]:
    """Remove the entries last used more than ``older_than_s`` seconds ago (None: every entry), and killed writers'
    temporary files; returns the entries removed and the bytes freed (temporary files included)."""
    import shutil

    now = time.time() if now is None else now
    removed, freed = [], 0
    for info in list_entries(root):
        if older_than_s is None or now - info.last_used > older_than_s:
            shutil.rmtree(info.folder, ignore_errors=True)
            removed.append(info)
            freed += info.bytes
            continue
        for tmp in info.folder.glob(f"{TMP_PREFIX}*"):
            try:
                stat = tmp.stat()
            except FileNotFoundError:  # its writer renamed it meanwhile
                continue
            if now - stat.st_mtime > STALE_TMP_S:
                tmp.unlink(missing_ok=True)
                freed += stat.st_size
    return removed, freed
