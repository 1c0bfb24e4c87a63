"""Small synthetic built domains (the folder layout of ``python -m shards build``), written into tmp_path."""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from shards import schema

BAD_IMAGE = b"definitely not a jpeg"


@dataclass
class Domain:
    folder: Path
    items: list[schema.Item]
    sequences: dict[int, schema.Sequence]
    """By user index (the ground truth a stream must reproduce)."""
    shard_sizes: list[int]
    bad_users: frozenset[int]
    """Users whose sample was written broken (counted in the manifest, but undecodable)."""

    @property
    def n_samples(self) -> int:
        return sum(self.shard_sizes)


def tiny_jpeg(color: tuple[int, int, int], size: tuple[int, int] = (12, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _catalog(name: str, n_items: int, bad_images: Collection[int]) -> list[schema.Item]:
    items = []
    for i in range(n_items):
        text = None if i % 5 == 3 else f"{name} item {i} " + "word " * (i % 7)
        image = None if i % 4 == 1 else tiny_jpeg((20 * i % 256, 90, 255 - 10 * i % 256), (12 + i % 3, 8 + i % 5))
        if i in bad_images:
            image = BAD_IMAGE
        items.append(schema.Item(index=i, id=f"{name}-{i}", text=text, image=image))
    return items


def _sequence(user: int, items: Sequence[schema.Item], rng: random.Random) -> schema.Sequence:
    chosen = [rng.randrange(len(items)) for _ in range(rng.randint(3, 9))]  # repeats happen
    distinct = list(dict.fromkeys(chosen))
    stamps = None if user % 3 == 2 else tuple(1.6e9 + 3600.0 * user + 60.0 * t for t in range(len(chosen)))
    return schema.Sequence(
        index=user,
        id=f"u{user}",
        items=tuple(items[i] for i in distinct),
        seq=tuple(distinct.index(i) for i in chosen),
        timestamps=stamps,
    )


def _write_tar(path: Path, samples: Sequence[dict]) -> dict:
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for sample in samples:
            sink.write(sample)
    data = path.read_bytes()
    return {"name": path.name, "samples": len(samples), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_domain(
    folder: Path,
    shard_sizes: Sequence[int],
    n_items: int = 15,
    seed: int = 0,
    bad_users: Collection[int] = (),
    bad_images: Collection[int] = (),
) -> Domain:
    """A built domain with one sequence shard per entry of ``shard_sizes`` (users numbered in shard order)."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    items = _catalog(folder.name, n_items, bad_images)
    sequences = {u: _sequence(u, items, rng) for u in range(sum(shard_sizes))}
    samples = [schema.encode_seq(s) for s in sequences.values()]
    for u in bad_users:
        samples[u]["json"] = b'{"schema": 1, "index": "not json'
    seq_shards, start = [], 0
    for number, size in enumerate(shard_sizes):
        path = folder / schema.shard_name("seqs", number)
        seq_shards.append(_write_tar(path, samples[start : start + size]))
        start += size
    item_shards = [_write_tar(folder / schema.shard_name("items", 0), [schema.encode_item(it) for it in items])]
    popularity = [0] * n_items
    for s in sequences.values():
        for index in s.item_indices()[:-2]:
            popularity[index] += 1
    manifest = {
        "schema": schema.SCHEMA_VERSION,
        "domain": folder.name,
        "counts": {
            "users": len(sequences),
            "items": n_items,
            "interactions": sum(len(s.seq) for s in sequences.values()),
        },
        "popularity": popularity,
        "shards": {"items": item_shards, "seqs": seq_shards},
    }
    (folder / schema.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return Domain(folder, items, sequences, list(shard_sizes), frozenset(bad_users))


@pytest.fixture
def make_domain(tmp_path: Path) -> Callable[..., Domain]:
    """Factory: ``make_domain(name, shard_sizes, **options)`` writes ``tmp_path/name``."""

    def make(name: str, shard_sizes: Sequence[int], **options) -> Domain:
        return write_domain(tmp_path / name, shard_sizes, **options)

    return make


@pytest.fixture
def two_domains(make_domain: Callable[..., Domain]) -> list[Domain]:
    """35 sequences in five uneven shards (7, 3, 11 | 5, 9) of two domains."""
    return [make_domain("books", [7, 3, 11], seed=1), make_domain("films", [5, 9], n_items=11, seed=2)]
