"""Source-format readers: each turns a publisher's layout into items and interactions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import InputError
from .base import RawInteraction, RawItem, Reader
from .generic import open_generic

FORMATS: dict[str, Callable[[Path, bool], Reader]] = {"generic": open_generic}

__all__ = ["FORMATS", "RawInteraction", "RawItem", "Reader", "open_reader"]


def open_reader(name: str, folder: str | Path, progress: bool = False) -> Reader:
    """The reader for format ``name`` over ``folder`` (an :class:`InputError` if either is wrong)."""
    if name not in FORMATS:
        raise InputError(f"unknown format {name!r}; known formats: {', '.join(sorted(FORMATS))}")
    return FORMATS[name](Path(folder), progress)
