"""``inspect`` (what a built domain holds) and ``verify`` (every shard against the manifest)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from . import schema
from .errors import InputError
from .writer import sha256_file


def read_shard(
    path: Path,
    handler: Callable[[Exception], bool] = wds.reraise_exception,
    select_files: Callable[[str], bool] | None = None,
) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar (field -> bytes; no decoder runs, so nothing is unpickled). Unreadable content raises,
    or goes to ``handler`` (True: skip it and go on, e.g. :class:`shards.stream.TarErrors`); ``select_files``: only
    the members whose names it accepts."""
    samples = wds.tarfile_to_samples(handler=handler, select_files=select_files)
    return iter(wds.DataPipeline(wds.SimpleShardList([str(path)]), samples))


def _image_desc(data: bytes | None) -> str:
    if data is None:
        return "none"
    try:
        with Image.open(io.BytesIO(data)) as img:
            return f"{img.format} {img.width}x{img.height}, {len(data)} bytes"
    except OSError as e:
        return f"unreadable ({e})"


def _split_desc(split: dict | None) -> str:
    """Where the validation and test targets come from (manifests from before the field: leave-one-out)."""
    if not split or split.get("kind") != "published":
        return "leave-one-out (each user's last two items)"
    kept, users = split.get("users_with_published_targets"), split.get("users")
    state = "intact" if kept == users else f"NOT intact: {kept:,} of {users:,} users keep the published targets"
    return f"published by the source files ({state})"


def summary(folder: str | Path) -> str:
    """A readable summary of a built domain and one decoded sample of each kind."""
    folder = Path(folder)
    m = schema.load_manifest(folder)
    c = m.raw["counts"]
    lines = [
        f"domain {m.domain!r} ({m.raw.get('format')}) in {folder}",
        f"  users {c['users']:,}  items {c['items']:,}  interactions {c['interactions']:,}"
        f"  (before filtering: {c['before_filtering']})",
        f"  items: text+image {c['items_text_and_image']:,}  text only {c['items_text_only']:,}"
        f"  image only {c['items_image_only']:,}  no content {c['items_without_content']:,}",
        f"  timestamps: {'yes' if m.raw.get('timestamps') else 'no (source order)'}",
        f"  split: {_split_desc(m.raw.get('split'))}",
    ]
    for kind in ("items", "seqs"):
        shards = m.shards(kind)
        size = sum(s.bytes for s in shards)
        lines.append(f"  {kind}: {len(shards)} shard(s), {size / 2**20:.1f} MiB")
    lines.append(f"  skipped records: {sum(m.raw['skipped_counts'].values())} {m.raw['skipped_counts']}")
    if m.item_shards:
        item = schema.decode_item(next(read_shard(folder / m.item_shards[0].name)))
        lines += ["first item:", f"  id {item.id!r}  text {item.text!r}", f"  image {_image_desc(item.image)}"]
    if m.seq_shards:
        seq = schema.decode_seq(next(read_shard(folder / m.seq_shards[0].name)))
        ids = [seq.items[p].id for p in seq.seq]
        lines += [
            f"first sequence: user {seq.id!r}, {len(ids)} interactions: {ids[:10]}{' ...' if len(ids) > 10 else ''}"
        ]
        for it in seq.items[:3]:
            lines.append(f"  item {it.id!r}: text {it.text!r:.70}  image {_image_desc(it.image)}")
    return "\n".join(lines)


def verify(folder: str | Path) -> list[str]:
    """Problems found (empty: the folder matches its manifest byte for byte and every sample decodes)."""
    folder = Path(folder)
    m = schema.load_manifest(folder)
    problems: list[str] = []
    listed = {s.name for kind in ("items", "seqs") for s in m.shards(kind)}
    for extra in sorted(p.name for p in folder.glob("*.tar") if p.name not in listed):
        problems.append(f"{extra}: shard not listed in the manifest")
    for kind in ("items", "seqs"):
        seen: list[int] = []
        for info in m.shards(kind):
            problems += _verify_shard(folder / info.name, info, kind, m, seen)
        expected = m.n_items if kind == "items" else m.n_users
        if sorted(seen) != list(range(expected)):
            problems.append(f"{kind}: sample indices are not exactly 0..{expected - 1} ({len(seen)} samples)")
    return problems


def size_problem(path: Path, info: schema.ShardInfo) -> str | None:
    """What is wrong with the shard file ``path`` against its manifest entry before any byte is read: ``missing``,
    or ``N bytes, manifest says M`` (a truncated copy, a half-written file); None when it has the listed size."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    return None if size == info.bytes else f"{size} bytes, manifest says {info.bytes}"


def check_sizes(folder: str | Path, kinds: tuple[schema.ShardKind, ...] = ("items", "seqs")) -> None:
    """An :class:`InputError` when a shard of ``kinds`` that the manifest lists is missing or not the size the
    manifest gives (:func:`size_problem`): the cheap part of :func:`verify`, run on the catalog before training so
    that a damaged one is not found only at the first validation, after the training it cost."""
    folder = Path(folder)
    m = schema.load_manifest(folder)
    for info in (info for kind in kinds for info in m.shards(kind)):
        if problem := size_problem(folder / info.name, info):
            what = "" if problem == "missing" else ": truncated or damaged"
            raise InputError(f"{folder / info.name}: {problem}{what} (python -m shards verify {folder})")


def _verify_shard(path: Path, info: schema.ShardInfo, kind: str, m: schema.Manifest, seen: list[int]) -> list[str]:
    if problem := size_problem(path, info):
        return [f"{info.name}: {problem}"]
    if sha256_file(path) != info.sha256:
        return [f"{info.name}: checksum differs from the manifest"]
    problems, count = [], 0
    try:
        for raw in read_shard(path):
            count += 1
            try:
                seen.append(_verified_index(raw, kind, m))
            except schema.SampleError as e:  # one problem line per bad sample; the shard's others are checked on
                problems.append(f"{info.name}: sample {e.key!r}: field {e.field!r}: {e.reason}")
    except (tarfile.TarError, EOFError, ValueError, OSError) as e:  # unreadable tar content
        problems.append(f"{info.name}: unreadable after {count} samples: {e}")
    if count != info.samples:
        problems.append(f"{info.name}: {count} samples, manifest says {info.samples}")
    return problems


def _verified_index(raw: dict[str, Any], kind: str, m: schema.Manifest) -> int:
    """The index of a sample that decodes, with its item (and user) indices within the manifest's counts and no
    member over :data:`~shards.schema.MAX_MEMBER_BYTES`; a :class:`~shards.schema.SampleError` otherwise."""
    if kind == "items":
        index = schema.decode_item(raw, n_items=m.n_items).index
    else:
        index = schema.decode_seq(raw, n_items=m.n_items, n_users=m.n_users).index
    for name, data in sorted(raw.items()):  # members no field declares are not read by decoding
        if isinstance(data, (bytes, bytearray)) and len(data) > schema.MAX_MEMBER_BYTES:
            reason = f"{len(data):,} bytes, over the limit of {schema.MAX_MEMBER_BYTES:,} (MAX_MEMBER_BYTES)"
            raise schema.SampleError(str(raw.get("__url__")), str(raw.get("__key__")), name, reason)
    return index


def describe_batches(stream: Any, n: int) -> str:
    """The epoch plan of a :class:`~shards.stream.SequenceStream` and the shapes of its first ``n`` batches."""
    plan = stream.plan()
    lines = [
        f"epoch {plan.epoch}: {plan.batches} batches of {plan.batch_size} per rank"
        f" x {len(plan.worker_batches)} rank(s);"
        f" {plan.dropped_samples} of {plan.total_samples} sequences left out (the remainder of the global batch)"
    ]
    for number, batch in zip(range(n), stream):
        length = batch.seq_mask.sum(1).float()
        lines.append(
            f"batch {number}: {len(batch)} sequences (history length {length.min():.0f}-{length.max():.0f}),"
            f" {len(batch.item_index)} distinct items for {int(batch.seq_mask.sum())} positions:"
            f" input_ids {tuple(batch.input_ids.shape)}, pixel_values {tuple(batch.pixel_values.shape)}"
            f" ({int(batch.has_text.sum())} with text, {int(batch.has_image.sum())} with image)"
        )
    if stream.stats:
        lines.append(f"stream events: {dict(stream.stats)}")
    return "\n".join(lines)
