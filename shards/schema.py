"""The one definition of what a momrec shard holds.

A built domain is a folder::

    manifest.json          counts, popularity, build options, shard list, skipped records
    items-000000.tar ...   one sample per catalog item
    seqs-000000.tar ...    one sample per user, item content inline

Tar members are named ``<key>.<field>`` as WebDataset expects; a key never contains a
dot (WebDataset groups members into samples by the text before the first dot).

Item sample (``items-*.tar``)::

    item00000042.json   {"schema": 1, "index": 42, "id": "B00X", "text": "..." | null}
    item00000042.jpg    JPEG bytes (absent when the item has no image)

Sequence sample (``seqs-*.tar``)::

    user00000007.json   {"schema": 1, "index": 7, "id": "u7",
                         "seq": [0, 1, 0, 2],            # positions into "items", chronological
                         "timestamps": [t0, t1, t2, t3] | null,
                         "items": [{"index": 42, "id": "B00X", "text": "..." | null, "image": true}, ...]}
    user00000007.img0000.jpg   JPEG of items[0] (only for items whose "image" is true)

``items`` lists each distinct item of the sequence once, in order of first appearance, so a
repeat purchase does not repeat its image bytes. The last two positions of ``seq`` are the
validation and test targets (leave-one-out).

Everything is decoded by :func:`decode_item` / :func:`decode_seq`, which parse JSON and keep
image bytes as bytes: nothing here unpickles or ``torch.load``s shard content.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import safejson
from .errors import InputError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
ITEM_SHARD_PREFIX = "items"
SEQ_SHARD_PREFIX = "seqs"
ShardKind = Literal["items", "seqs"]
Modality = Literal["text", "image"]
MODALITIES: tuple[Modality, ...] = ("text", "image")
MIN_SEQ_LEN = 3  # at least one training item, then the validation and test targets
MAX_MEMBER_BYTES = 64 << 20
"""The largest tar member (a sample's JSON, one image) a reader accepts: a bigger one makes its sample bad (a
counted skip in the stream, a problem for ``verify``), not a parse of gigabytes. A sequence sample's JSON is
typically a few KB to a few hundred KB."""
MAX_INDEX = 2**63
"""Item and user indices are below this (they become 64-bit tensors) even where the catalog's size is not known."""

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class SampleError(ValueError):
    """A shard sample that does not follow the schema (names the shard, key and field)."""

    def __init__(self, shard: str, key: str, field: str, reason: str) -> None:
        self.shard, self.key, self.field, self.reason = shard, key, field, reason
        super().__init__(f"{shard}: sample {key!r}: field {field!r}: {reason}")


def shard_name(kind: ShardKind, number: int) -> str:
    return f"{kind}-{number:06d}.tar"


def item_key(index: int) -> str:
    return f"item{index:08d}"


def user_key(index: int) -> str:
    return f"user{index:08d}"


def image_field(position: int) -> str:
    """Tar field holding the image of ``items[position]`` of a sequence sample."""
    return f"img{position:04d}.jpg"


_IMAGE_FIELD = re.compile(r"img\d{4}\.jpg")


def is_image_field(field: str) -> bool:
    """Whether ``field`` (a tar member's extension) is an item image of a sequence sample (:func:`image_field`)."""
    return _IMAGE_FIELD.fullmatch(field) is not None


def is_image_member(name: str) -> bool:
    """Whether the tar member ``name`` (``user00000007.img0000.jpg``) is an item image of a sequence sample."""
    return is_image_field(name.rpartition("/")[2].partition(".")[2])


def check_key(key: str) -> str:
    """Reject keys WebDataset would split or mangle (a dot breaks its grouping of members)."""
    if not _KEY_RE.match(key):
        raise ValueError(f"invalid sample key {key!r}: only letters, digits, '_' and '-' are allowed")
    return key


@dataclass(frozen=True)
class Item:
    """One catalog item: its content, as stored in both shard kinds."""

    index: int
    """Position in the domain's catalog, 0..n_items-1 (stable across a build; the ID-embedding row)."""
    id: str
    """The publisher's item id, as a string (H&M ids keep their leading zero)."""
    text: str | None
    """Text rendered from the build's template; None when the item has no text."""
    image: bytes | None = field(default=None, repr=False)
    """JPEG bytes; None when the item has no image."""

    @property
    def modalities(self) -> tuple[Modality, ...]:
        return tuple(m for m, present in zip(MODALITIES, (self.text is not None, self.image is not None)) if present)


@dataclass(frozen=True)
class Sequence:
    """One user's chronological interactions, with each distinct item's content inline."""

    index: int
    """Position of the user in the domain (0..n_users-1)."""
    id: str
    """The publisher's user id."""
    items: tuple[Item, ...]
    """Distinct items of the sequence, in order of first appearance."""
    seq: tuple[int, ...]
    """Chronological positions into ``items``; the last two are the validation and test targets."""
    timestamps: tuple[float, ...] | None = None
    """One timestamp per position of ``seq`` (unix seconds), or None when the source has no time."""

    def item_indices(self) -> list[int]:
        """Catalog indices of the chronological sequence."""
        return [self.items[p].index for p in self.seq]


def _dumps(obj: Any) -> bytes:
    # sort_keys + fixed separators: the same sample always gives the same bytes (deterministic shards)
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _item_meta(item: Item) -> dict[str, Any]:
    return {"index": item.index, "id": item.id, "text": item.text}


def encode_item(item: Item) -> dict[str, Any]:
    """The WebDataset sample (``__key__`` plus field -> bytes) for an items shard."""
    sample: dict[str, Any] = {
        "__key__": check_key(item_key(item.index)),
        "json": _dumps({"schema": SCHEMA_VERSION, **_item_meta(item)}),
    }
    if item.image is not None:
        sample["jpg"] = item.image
    return sample


def encode_seq(seq: Sequence) -> dict[str, Any]:
    """The WebDataset sample for a sequences shard."""
    if len(seq.seq) < MIN_SEQ_LEN:
        raise ValueError(f"user {seq.id!r}: a sequence needs at least {MIN_SEQ_LEN} interactions, got {len(seq.seq)}")
    if seq.timestamps is not None and len(seq.timestamps) != len(seq.seq):
        raise ValueError(f"user {seq.id!r}: {len(seq.timestamps)} timestamps for {len(seq.seq)} interactions")
    meta = {
        "schema": SCHEMA_VERSION,
        "index": seq.index,
        "id": seq.id,
        "seq": list(seq.seq),
        "timestamps": None if seq.timestamps is None else list(seq.timestamps),
        "items": [{**_item_meta(it), "image": it.image is not None} for it in seq.items],
    }
    sample: dict[str, Any] = {"__key__": check_key(user_key(seq.index)), "json": _dumps(meta)}
    for pos, it in enumerate(seq.items):
        if it.image is not None:
            sample[image_field(pos)] = it.image
    return sample


# ---- decoding (readers) -------------------------------------------------------------------------


def _source(raw: Mapping[str, Any]) -> str:
    return str(raw.get("__url__", "<sample>"))


def _member(raw: Mapping[str, Any], name: str, where: tuple[str, str]) -> bytes | None:
    """The bytes of the member ``name`` (None if absent); a :class:`SampleError` if they are no bytes or more than
    :data:`MAX_MEMBER_BYTES`."""
    data = raw.get(name)
    if data is None:
        return None
    if not isinstance(data, (bytes, bytearray)):
        raise SampleError(*where, name, "not bytes")
    if len(data) > MAX_MEMBER_BYTES:
        raise SampleError(
            *where, name, f"{len(data):,} bytes, over the limit of {MAX_MEMBER_BYTES:,} (MAX_MEMBER_BYTES)"
        )
    return bytes(data)


def _load_json(raw: Mapping[str, Any], where: tuple[str, str]) -> dict[str, Any]:
    data = _member(raw, "json", where)
    if data is None:
        raise SampleError(*where, "json", "missing")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleError(*where, "json", f"not valid UTF-8 (byte {e.start})") from None
    try:
        meta = safejson.loads(text)
    except safejson.JSONProblem as e:  # malformed, nested too deeply, or a number too long to convert
        raise SampleError(*where, "json", f"malformed JSON: {e.reason} at column {e.column(text)}") from None
    if not isinstance(meta, dict):
        raise SampleError(*where, "json", "not a JSON object")
    if meta.get("schema") != SCHEMA_VERSION:
        raise SampleError(*where, "schema", f"expected {SCHEMA_VERSION}, got {meta.get('schema')!r}")
    return meta


def _typed(
    meta: Mapping[str, Any], name: str, types: tuple[type, ...], where: tuple[str, str], prefix: str = ""
) -> Any:
    value = meta.get(name)
    # bool is an int in Python: a JSON true is not an index
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise SampleError(where[0], where[1], prefix + name, f"expected {expected}, got {type(value).__name__}")
    return value


def _index(meta: Mapping[str, Any], name: str, bound: int | None, where: tuple[str, str], prefix: str = "") -> int:
    """``meta[name]``, an integer in [0, ``bound``) (the catalog's items or the domain's users), or below
    :data:`MAX_INDEX` when the bound is not known."""
    value = _typed(meta, name, (int,), where, prefix)
    if not 0 <= value < (MAX_INDEX if bound is None else bound):
        shown = str(value) if abs(value) < 10**30 else f"a {len(str(abs(value)))}-digit number"
        raise SampleError(*where, prefix + name, f"{shown} is outside [0, {'2**63' if bound is None else bound})")
    return value


def _decode_item_meta(
    meta: Mapping[str, Any], where: tuple[str, str], n_items: int | None, prefix: str = ""
) -> tuple[int, str, str | None]:
    index = _index(meta, "index", n_items, where, prefix)
    item_id = _typed(meta, "id", (str,), where, prefix)
    text = _typed(meta, "text", (str, type(None)), where, prefix)
    return index, item_id, text


def decode_item(raw: Mapping[str, Any], *, n_items: int | None = None) -> Item:
    """An :class:`Item` from a raw WebDataset sample of an items shard (raises :class:`SampleError`).
    ``n_items``: the catalog's size (the manifest's), which the item's index must be below."""
    where = (_source(raw), str(raw.get("__key__", "?")))
    meta = _load_json(raw, where)
    index, item_id, text = _decode_item_meta(meta, where, n_items)
    return Item(index=index, id=item_id, text=text, image=_member(raw, "jpg", where))


def decode_seq(
    raw: Mapping[str, Any], images: bool = True, *, n_items: int | None = None, n_users: int | None = None
) -> Sequence:
    """A :class:`Sequence` from a raw WebDataset sample of a seqs shard (raises :class:`SampleError`).
    ``images=False``: the sample was read without its image members (a stream for a model without content):
    no item gets image bytes, and none is required. ``n_items`` and ``n_users`` (the manifest's counts) bound the
    item and user indices; unknown, they only have to fit a 64-bit index."""
    where = (_source(raw), str(raw.get("__key__", "?")))
    meta = _load_json(raw, where)
    index = _index(meta, "index", n_users, where)
    user_id = _typed(meta, "id", (str,), where)
    entries = _typed(meta, "items", (list,), where)
    items = tuple(_seq_item(raw, entry, pos, images, n_items, where) for pos, entry in enumerate(entries))
    positions = _typed(meta, "seq", (list,), where)
    if len(positions) < MIN_SEQ_LEN:
        raise SampleError(*where, "seq", f"needs at least {MIN_SEQ_LEN} interactions, got {len(positions)}")
    if not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < len(items) for p in positions):
        raise SampleError(*where, "seq", f"positions must be integers in [0, {len(items)})")
    stamps = _timestamps(meta.get("timestamps"), len(positions), where)
    return Sequence(index=index, id=user_id, items=items, seq=tuple(positions), timestamps=stamps)


def _seq_item(
    raw: Mapping[str, Any], entry: Any, pos: int, images: bool, n_items: int | None, where: tuple[str, str]
) -> Item:
    """``items[pos]`` of a sequence sample, with its image member when it declares one (and ``images``)."""
    if not isinstance(entry, dict):
        raise SampleError(*where, f"items[{pos}]", "not a JSON object")
    index, item_id, text = _decode_item_meta(entry, where, n_items, prefix=f"items[{pos}].")
    has_image = _typed(entry, "image", (bool,), where, f"items[{pos}].")
    image = _member(raw, image_field(pos), where) if has_image and images else None
    if has_image and images and image is None:
        raise SampleError(*where, image_field(pos), "declared in items but missing from the sample")
    return Item(index=index, id=item_id, text=text, image=image)


def _timestamps(stamps: Any, n: int, where: tuple[str, str]) -> tuple[float, ...] | None:
    """The ``timestamps`` field: None, or ``n`` finite numbers (as floats)."""
    if stamps is None:
        return None
    problem = SampleError(*where, "timestamps", "must be null or one finite number per position of seq")
    if not isinstance(stamps, list) or len(stamps) != n:
        raise problem
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in stamps):
        raise problem
    try:
        floats = tuple(float(t) for t in stamps)
    except OverflowError:  # an integer beyond the range of a float
        raise problem from None
    if not all(math.isfinite(t) for t in floats):
        raise problem
    return floats


# ---- manifest ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    """One shard file as listed in the manifest."""

    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The parts of ``manifest.json`` that readers rely on; ``raw`` keeps the whole document."""

    domain: str
    n_users: int
    n_items: int
    n_interactions: int
    popularity: tuple[int, ...]
    """Training interactions per catalog index (the validation and test targets excluded)."""
    item_shards: tuple[ShardInfo, ...]
    seq_shards: tuple[ShardInfo, ...]
    raw: dict[str, Any] = field(repr=False, compare=False)

    def shards(self, kind: ShardKind) -> tuple[ShardInfo, ...]:
        return self.item_shards if kind == "items" else self.seq_shards


def _shard_list(doc: Mapping[str, Any], kind: ShardKind, path: Path) -> tuple[ShardInfo, ...]:
    try:
        return tuple(
            ShardInfo(name=str(s["name"]), samples=int(s["samples"]), bytes=int(s["bytes"]), sha256=str(s["sha256"]))
            for s in doc["shards"][kind]
        )
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: field 'shards.{kind}' is malformed ({e!r})") from None


def load_manifest(folder: str | Path) -> Manifest:
    """Read and check ``folder/manifest.json``; an :class:`InputError` names what is wrong."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"{path}: no manifest (is {folder} a folder written by 'python -m shards build'?)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    try:
        doc = safejson.loads(text)
    except safejson.JSONProblem as e:
        where = {"file": str(path), "line": text.count("\n", 0, e.pos) + 1}
        raise InputError(f"malformed JSON: {e.reason} at column {e.column(text)}", **where) from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_VERSION:
        raise InputError(f"{path}: field 'schema': expected {SCHEMA_VERSION}")
    try:
        counts = doc["counts"]
        manifest = Manifest(
            domain=str(doc["domain"]),
            n_users=int(counts["users"]),
            n_items=int(counts["items"]),
            n_interactions=int(counts["interactions"]),
            popularity=tuple(int(c) for c in doc["popularity"]),
            item_shards=_shard_list(doc, "items", path),
            seq_shards=_shard_list(doc, "seqs", path),
            raw=doc,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: missing or malformed field ({e})") from None
    if len(manifest.popularity) != manifest.n_items:
        n_pop = len(manifest.popularity)
        raise InputError(f"{path}: field 'popularity' has {n_pop} entries for {manifest.n_items} items")
    return manifest


def dumps_manifest(doc: dict[str, Any]) -> str:
    """The manifest's text: stable key order, so identical builds give identical bytes."""
    return json.dumps(doc, ensure_ascii=False, sort_keys=True, indent=1) + "\n"
