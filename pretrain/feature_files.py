"""The files of the feature store: segments (safetensors bytes with a sha256 of the whole file in their metadata,
computed with that field zeroed), written atomically under a temporary name, and checked when read back.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

FORMAT = "momrec-features/1"
ENTRY_FILE = "entry.json"
SEGMENT_GLOB = "seg-*.safetensors"
TMP_PREFIX = ".tmp-"
_ZERO_DIGEST = "0" * 64
_MAX_HEADER = 100 << 20


class CorruptSegment(ValueError):
    """A segment whose bytes do not match its checksum, or that is not a segment of its entry."""


def checksummed(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors bytes with metadata ``sha256`` = the sha256 of those bytes with that field zeroed."""
    data = safetensors.torch.save(tensors, metadata={**metadata, "sha256": _ZERO_DIGEST})
    n = struct.unpack("<Q", data[:8])[0]
    at = data.index(_ZERO_DIGEST.encode(), 8, 8 + n)
    digest = hashlib.sha256(data).hexdigest()
    return data[:at] + digest.encode() + data[at + 64 :]


def _header(data: bytes, size: int | None = None) -> dict[str, Any]:
    """The JSON header of safetensors bytes (``data`` may hold only the header; ``size``: the whole file's)."""
    if len(data) < 8:
        raise CorruptSegment("shorter than a safetensors header")
    n = struct.unpack("<Q", data[:8])[0]
    if n > _MAX_HEADER or 8 + n > (len(data) if size is None else size) or len(data) < 8 + n:
        raise CorruptSegment("truncated header")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptSegment(f"unreadable header ({e})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise CorruptSegment("no metadata")
    return header


def decode_segment(data: bytes, entry_key: str) -> dict[int, torch.Tensor]:
    """Item index -> tensor of a segment's bytes, after checking its checksum and that it belongs to the entry."""
    meta = _header(data)["__metadata__"]
    digest = meta.get("sha256", "")
    if meta.get("format") != FORMAT or meta.get("entry") != entry_key or len(digest) != 64:
        raise CorruptSegment("not a segment of this entry")
    n = struct.unpack("<Q", data[:8])[0]
    at = data.find(digest.encode(), 8, 8 + n)
    if at < 0 or hashlib.sha256(data[:at] + _ZERO_DIGEST.encode() + data[at + 64 :]).hexdigest() != digest:
        raise CorruptSegment("checksum mismatch")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own SafetensorError on inconsistent offsets
        raise CorruptSegment(f"unreadable tensors ({e})") from None
    return {_item_of(name): t for name, t in tensors.items()}


def _item_of(name: str) -> int:
    if not (name.startswith("i") and name[1:].isdigit()):
        raise CorruptSegment(f"unexpected tensor {name!r}")
    return int(name[1:])


def segment_items(path: Path) -> list[int]:
    """The item indices a segment's header lists (its bytes are checked when it is read)."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        data = head + f.read(min(n, _MAX_HEADER))
    header = _header(data, path.stat().st_size)
    return [_item_of(name) for name in header if name != "__metadata__"]


def write_atomic(folder: Path, name: str, data: bytes) -> Path:
    """``folder/name`` holding ``data``, or nothing: a temporary file of this writer's own (``O_EXCL``) is written,
    fsynced and renamed into place; the folder is fsynced so the rename survives a crash."""
    tmp = folder / f"{TMP_PREFIX}{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return folder / name
