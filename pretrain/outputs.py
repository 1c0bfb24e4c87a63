"""Folders that rank 0 writes for every rank: the pretrained export (:func:`pretrain.checkpoint.export`) and
finetune's model folders (:func:`finetune.export.save_finetuned`).

The folder is written through :func:`shards.outdir.atomic_folder` (free space checked first, nothing
complete-looking left by a failure, a full disk one clear error), and rank 0's verdict is broadcast, so a failed
write raises the same ValueError on every rank instead of a traceback on rank 0 and a collective that fails on the
others.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from shards.outdir import atomic_folder

from .distributed import rank, world_size

SAFETENSORS_ENTRY_BYTES = 256
"""A tensor's entry in a safetensors header (name, dtype, shape, offsets), at most for our names."""


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """What ``tensors`` take in a safetensors file."""
    return sum(t.numel() * t.element_size() + SAFETENSORS_ENTRY_BYTES for t in tensors.values())


@contextlib.contextmanager
def rank0_folder(folder: Path, needed: int, what: str) -> Iterator[Path | None]:
    """On rank 0, the temporary folder to write ``folder``'s files into (``needed`` bytes, about), renamed into place
    when the block ends; None on the other ranks. Every rank must enter it; every rank raises alike when rank 0
    could not write (ValueError; rank 0's own other errors are re-raised there, and a ValueError on the others)."""
    dist = torch.distributed
    several = world_size() > 1
    verdict: list[str | None] = [None]
    failure: ValueError | None = None
    if rank() == 0:
        try:
            with atomic_folder(folder, needed, what) as tmp:
                yield tmp
        except ValueError as e:  # InputError too: no room, or the disk filled up while writing
            verdict, failure = [str(e)], e
        except BaseException as e:
            if several:  # the others are waiting for the verdict: they stop too, pointing here
                dist.broadcast_object_list([f"rank 0 failed to write {what}: {e!r} (see its log)"], src=0)
            raise
    else:
        yield None
    if several:
        dist.broadcast_object_list(verdict, src=0)
    if failure is not None:
        raise failure
    if verdict[0] is not None:
        raise ValueError(verdict[0])


def write_json(path: Path, doc: Any, indent: int = 1) -> Path:
    """Write ``doc`` to ``path`` as JSON, atomically (a temporary file renamed over it; its folder made if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=indent) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
