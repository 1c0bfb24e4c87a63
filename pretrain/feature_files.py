"""The files of the feature store: segments (safetensors bytes with a sha256 of the whole file in their metadata,
computed with that field zeroed), written atomically under a temporary name, and checked when read back.
"""

from __future__ import annotations

import hashlib
import json
import math
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


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}  # fmt: skip


class Segment:
    """A segment's bytes, checked once (checksum, entry, every tensor's dtype, shape and span): its items' tensors
    are then taken out one by one (:meth:`tensor`, a copy), so a reader that wants a few items of a large segment
    does not build the others. The bytes are read as safetensors stores them, little-endian, as on every host torch
    runs on here (x86-64, arm64)."""

    def __init__(self, data: bytearray, entry_key: str) -> None:
        header = _header(data)
        meta = header.pop("__metadata__")
        digest = meta.get("sha256", "")
        if meta.get("format") != FORMAT or meta.get("entry") != entry_key or len(digest) != 64:
            raise CorruptSegment("not a segment of this entry")
        n = struct.unpack("<Q", data[:8])[0]
        at = data.find(digest.encode(), 8, 8 + n)
        if at < 0 or _zeroed_digest(data, at) != digest:
            raise CorruptSegment("checksum mismatch")
        self.data, self.base = data, 8 + n
        self.spans = {_item_of(name): _span(name, info, len(data) - self.base) for name, info in header.items()}
        """Item index -> (dtype, shape, start of its bytes after the header)."""

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def items(self) -> list[int]:
        return list(self.spans)

    def tensor(self, index: int) -> torch.Tensor:
        """Item ``index``'s tensor (its own memory: it does not keep the segment's bytes alive)."""
        dtype, shape, begin = self.spans[index]
        numel = math.prod(shape)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self.data, dtype=dtype, count=numel, offset=self.base + begin)
        return flat.reshape(shape).clone()


def _zeroed_digest(data: bytearray, at: int) -> str:
    """sha256 of ``data`` with its 64 bytes at ``at`` read as zero digits (without copying ``data``)."""
    view = memoryview(data)
    digest = hashlib.sha256(view[:at])
    digest.update(_ZERO_DIGEST.encode())
    digest.update(view[at + 64 :])
    return digest.hexdigest()


def _span(name: str, info: Any, size: int) -> tuple[torch.dtype, list[int], int]:
    """(dtype, shape, begin) of a tensor's header entry, checked against the data's ``size`` bytes."""
    try:
        dtype, shape, (begin, end) = _DTYPES[info["dtype"]], list(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise CorruptSegment(f"tensor {name!r}: bad header entry") from None
    if not all(isinstance(d, int) and d >= 0 for d in [*shape, begin, end]):
        raise CorruptSegment(f"tensor {name!r}: bad shape or offsets")
    if not begin <= end <= size or end - begin != math.prod(shape) * dtype.itemsize:
        raise CorruptSegment(f"tensor {name!r}: its bytes do not match its shape")
    return dtype, shape, begin


def read_segment(path: Path, entry_key: str) -> Segment:
    """The segment at ``path``, checked (:class:`Segment`)."""
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        got = f.readinto(data)
    return Segment(data[:got] if got != len(data) else data, entry_key)


def decode_segment(data: bytes, entry_key: str) -> dict[int, torch.Tensor]:
    """Item index -> tensor of a segment's bytes, after checking its checksum and that it belongs to the entry."""
    segment = Segment(bytearray(data), entry_key)
    return {i: segment.tensor(i) for i in segment.items()}


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
