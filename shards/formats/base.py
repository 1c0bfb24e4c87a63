"""What every source-format reader yields, and the line readers they share.

A reader turns one domain in its publisher's layout into two streams, items and
interactions, and records what it cannot read in a :class:`~shards.errors.Skips`. The builder
(:mod:`shards.build`) does everything else: templates, images, ordering, filtering, shards.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import InputError, Skips
from ..progress import bar

FieldValue = str | int | float | list | None


@dataclass(frozen=True)
class RawItem:
    """An item as read from the source: its id, its text fields, and where its image is."""

    id: str
    fields: dict[str, FieldValue]
    image: Path | None
    file: str
    line: int | None


@dataclass(frozen=True)
class RawInteraction:
    """One user-item interaction, in the source's order."""

    user: str
    item: str
    timestamp: float | None
    file: str
    line: int | None


class Reader(Protocol):
    """A source format. ``items`` is read before ``interactions``."""

    default_template: str | None
    """Text template used when the user gives none (``None``: every text field, in order)."""

    def items(self, skips: Skips) -> Iterator[RawItem]: ...

    def interactions(self, skips: Skips) -> Iterator[RawInteraction]: ...


def require_file(folder: Path, name: str, what: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise InputError(f"missing {what} file {name!r} in {folder}")
    return path


def _progress_lines(path: Path, progress: bool) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) with a byte-based progress bar."""
    size = path.stat().st_size
    with open(path, "rb") as f, bar(enabled=progress, total=size, unit="B", unit_scale=True, desc=path.name) as b:
        for number, raw in enumerate(f, start=1):
            b.update(len(raw))
            yield number, raw


def decoded_lines(path: Path, skips: Skips, progress: bool = False) -> Iterator[tuple[int, str]]:
    """UTF-8 lines without their line ending; a non-UTF-8 line is a counted skip."""
    for number, raw in _progress_lines(path, progress):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            skips.add(path.name, number, None, f"not UTF-8: byte {e.start}")
            continue
        yield number, text.rstrip("\r\n")


def read_jsonl(path: Path, skips: Skips, progress: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """One JSON object per line; blank lines are ignored, malformed ones are counted skips."""
    for number, text in decoded_lines(path, skips, progress):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            skips.add(path.name, number, None, f"malformed JSON: {e.msg} at column {e.colno}")
            continue
        if not isinstance(obj, dict):
            skips.add(path.name, number, None, f"malformed JSON: expected an object, got {type(obj).__name__}")
            continue
        yield number, obj


def read_csv(
    path: Path, skips: Skips, required: Sequence[str], *, delimiter: str = ",", progress: bool = False
) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a CSV file with a header, as dicts; rows with the wrong number of fields are counted skips.

    A missing required column is an error (the whole file is unusable), not a skip.
    """
    lines = decoded_lines(path, skips, progress)
    numbers: list[int] = []

    def texts() -> Iterator[str]:  # csv.reader pulls lines; remember each one's number
        for number, text in lines:
            numbers.append(number)
            yield text

    reader = csv.reader(texts(), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        raise InputError("empty file: expected a header line", file=path.name, line=1)
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(f"header {header} lacks column(s) {missing}", file=path.name, line=numbers[-1])
    for row in reader:
        number = numbers[-1]
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            skips.add(path.name, number, None, f"malformed row: {len(row)} fields, header has {len(header)}")
            continue
        yield number, dict(zip(header, row))


def resolve_image(root: Path, relative: Any, skips: Skips, file: str, line: int | None, field: str) -> Path | None:
    """The image path inside ``root``, or None with a counted skip (a path may not leave the input folder)."""
    if relative is None or relative == "":
        return None
    if not isinstance(relative, str):
        skips.add(file, line, field, f"wrong type: expected a path string, got {type(relative).__name__}")
        return None
    base = root.resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        skips.add(file, line, field, f"image path outside the input folder: {relative!r}")
        return None
    if not path.is_file():
        skips.add(file, line, field, f"image not found: {relative!r}")
        return None
    return path


def parse_timestamp(value: str, skips: Skips, file: str, line: int, field: str) -> float | None:
    """A finite number of seconds, or None with a counted skip."""
    try:
        stamp = float(value)
    except ValueError:
        stamp = float("nan")
    if not math.isfinite(stamp):
        skips.add(file, line, field, f"malformed timestamp: {value!r}")
        return None
    return stamp
