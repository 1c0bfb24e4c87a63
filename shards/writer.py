"""Writing samples into numbered tar shards (``items-000000.tar``, ...), with the manifest entry of each: name,
samples, bytes and sha256."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import webdataset as wds

from . import schema
from .progress import bar as progress_bar


def write_shards(
    folder: Path, kind: schema.ShardKind, samples: Iterable[dict], per_shard: int, total: int, progress: bool
) -> list[dict[str, Any]]:
    """Write samples into numbered tar files; returns the manifest's shard list."""
    shards: list[dict[str, Any]] = []
    writer, count = None, 0
    bar = progress_bar(enabled=progress, total=total, desc=f"{kind} shards", unit="sample")
    for sample in samples:
        if writer is None:
            name = schema.shard_name(kind, len(shards))
            writer, count = wds.TarWriter(str(folder / name), encoder=False, mtime=0, user="momrec", group="momrec"), 0
        writer.write(sample)
        count += 1
        bar.update()
        if count == per_shard:
            writer.close()
            shards.append(_shard_info(folder / name, count))
            writer = None
    if writer is not None:
        writer.close()
        shards.append(_shard_info(folder / name, count))
    bar.close()
    return shards


def _shard_info(path: Path, samples: int) -> dict[str, Any]:
    return {"name": path.name, "samples": samples, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
