"""What every source-format reader yields, and the line readers they share.

A reader turns one domain in its publisher's layout into two streams, items and
interactions, and records what it cannot read in a :class:`~shards.errors.Skips`. The builder
(:mod:`shards.build`) does everything else: templates, images, ordering, filtering, shards.
"""

from __future__ import annotations

import csv
import fnmatch
import gzip
import html
import io
import math
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from .. import safejson
from ..errors import InputError, Skips
from ..progress import bar
from ..safejson import JSONProblem

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


_TAG = re.compile(r"<[^<>]*>")


def clean_text(value: Any) -> Any:
    """Strings lose HTML tags and entities; lists and objects are cleaned element-wise; anything else is unchanged."""
    if isinstance(value, str):
        return html.unescape(_TAG.sub(" ", value)) if "<" in value or "&" in value else value
    if isinstance(value, list):
        return [clean_text(v) for v in value]
    if isinstance(value, dict):
        return {k: clean_text(v) for k, v in value.items()}
    return value


def require_file(folder: Path, name: str, what: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise InputError(f"missing {what} file {name!r} in {folder}")
    return path


GZIP_MAGIC = b"\x1f\x8b"


def _progress_lines(path: Path, progress: bool) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) with a byte-based progress bar.

    A gzip file (recognised by its magic bytes, whatever its name) is decompressed on the fly; its bar
    counts compressed bytes read. A truncated or corrupt gzip stream is an :class:`InputError`.
    """
    size = path.stat().st_size
    with open(path, "rb") as f, bar(enabled=progress, total=size, unit="B", unit_scale=True, desc=path.name) as b:
        if f.read(2) != GZIP_MAGIC:
            f.seek(0)
            for number, raw in enumerate(f, start=1):
                b.update(len(raw))
                yield number, raw
            return
        f.seek(0)
        yield from _gzip_lines(path, f, b)


def _gzip_lines(path: Path, f: BinaryIO, b: Any) -> Iterator[tuple[int, bytes]]:
    number, done = 0, 0
    try:
        with gzip.GzipFile(fileobj=f, mode="rb") as z, io.BufferedReader(z, 1 << 16) as lines:
            for number, raw in enumerate(lines, start=1):
                if number % 1024 == 0:  # asking for the compressed position costs a system call: not every line
                    position = f.tell()
                    b.update(position - done)
                    done = position
                yield number, raw
    except (EOFError, OSError, zlib.error) as e:  # truncated, or corrupt (BadGzipFile is an OSError)
        raise InputError(f"corrupt or truncated gzip data after line {number}: {e}", file=path.name) from None
    b.update(f.tell() - done)


def decoded_lines(path: Path, skips: Skips, progress: bool = False) -> Iterator[tuple[int, str]]:
    """UTF-8 lines without their line ending (and without a byte-order mark opening the file); a non-UTF-8
    line is a counted skip. Gzip files are read transparently."""
    for number, raw in _progress_lines(path, progress):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            skips.add(path.name, number, None, f"not UTF-8: byte {e.start}")
            continue
        yield number, text.rstrip("\r\n")


def load_json_line(text: str, file: str, line: int, skips: Skips) -> Any:
    """The JSON value of one line, or None with a counted skip: malformed, nested deeper than
    :data:`~shards.safejson.MAX_JSON_DEPTH` (the recursive cleaning and rendering of fields would overflow the
    stack), or holding a number too long to convert (:func:`shards.safejson.loads`)."""
    try:
        return safejson.loads(text)
    except JSONProblem as e:
        skips.add(file, line, None, f"malformed JSON: {e.reason} at column {e.column(text)}")
        return None


def read_jsonl(path: Path, skips: Skips, progress: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """One JSON object per line; blank lines are ignored, malformed ones are counted skips."""
    for number, text in decoded_lines(path, skips, progress):
        if not text.strip():
            continue
        obj = load_json_line(text, path.name, number, skips)
        if obj is None:
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
            yield text + "\n"  # the line end back: a quoted field spanning lines keeps its line break

    reader = csv.reader(texts(), delimiter=delimiter)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise InputError(f"malformed header: {_csv_problem(e)}", file=path.name, line=numbers[-1]) from None
    if header is None:
        raise InputError("empty file: expected a header line", file=path.name, line=1)
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(f"header {header} lacks column(s) {missing}", file=path.name, line=numbers[-1])
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # the parser drops the line and goes on with the next one
            skips.add(path.name, numbers[-1], None, f"malformed row: {_csv_problem(e)}")
            continue
        number = numbers[-1]
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            skips.add(path.name, number, None, f"malformed row: {len(row)} fields, header has {len(header)}")
            continue
        yield number, dict(zip(header, row))


def _csv_problem(error: csv.Error) -> str:
    """What the csv parser found, in the user's terms (a lone carriage return is the usual cause)."""
    if "new-line character" in str(error):
        return "a carriage return (\\r) inside an unquoted field"
    return str(error)


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


def require_one(folder: Path, pattern: str | Sequence[str], what: str, *, exclude: str | None = None) -> Path:
    """The single file of ``folder`` matching the glob ``pattern`` (or any of several globs; names matching the
    glob ``exclude`` do not count); an :class:`InputError` if none or several."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    found = sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()})
    found = [p for p in found if exclude is None or not fnmatch.fnmatch(p.name, exclude)]
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise InputError(f"expected one {what} file {' or '.join(map(repr, patterns))} in {folder}, found {names}")
    return found[0]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def find_image(folder: Path, stem: str) -> Path | None:
    """``folder/<stem>.jpg`` (or .jpeg, .png) if it exists; None otherwise: in layouts that name images by
    item id, an item without an image file is no error. A stem that is not a plain file name finds nothing."""
    if not stem or stem.startswith(".") or "/" in stem or "\\" in stem:
        return None
    for suffix in IMAGE_SUFFIXES:
        path = folder / (stem + suffix)
        if path.is_file():
            return path
    return None


def read_json_object(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(line of the key, key, value) for each member of a file holding one JSON object (``{"k": v, ...}``, as
    LC-Rec writes its data), in file order; gzip is read transparently. The file is one document, so a syntax
    error anywhere makes it unusable: an :class:`InputError` with its line and column, not a skip (so is a value
    nested deeper than :data:`~shards.safejson.MAX_JSON_DEPTH`)."""
    raw = path.read_bytes()
    if raw.startswith(GZIP_MAGIC):
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise InputError(f"corrupt or truncated gzip data: {e}", file=path.name) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8: byte {e.start}", file=path.name, line=raw.count(b"\n", 0, e.start) + 1) from None
    yield from _object_members(text, path.name)


def _object_members(text: str, file: str) -> Iterator[tuple[int, str, Any]]:
    line, counted = 1, 0

    def line_at(pos: int) -> int:  # lines are counted incrementally: the members come in file order
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def fail(pos: int, what: str) -> InputError:
        column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        return InputError(f"malformed JSON: {what} at column {column}", file=file, line=line_at(pos))

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def decode(pos: int) -> tuple[Any, int]:
        try:
            return safejson.raw_decode(text, pos)
        except JSONProblem as e:
            raise fail(e.pos, e.reason) from None

    pos = skip_ws(0)
    if not text.startswith("{", pos):
        raise fail(pos, "expected the file to be one JSON object '{...}'")
    pos = skip_ws(pos + 1)
    if text.startswith("}", pos):
        pos += 1
    else:
        while True:
            if not text.startswith('"', pos):
                raise fail(pos, "expected a member name in double quotes")
            key_line = line_at(pos)
            key, pos = decode(pos)
            pos = skip_ws(pos)
            if not text.startswith(":", pos):
                raise fail(pos, "expected ':'")
            value, pos = decode(skip_ws(pos + 1))
            yield key_line, key, value
            pos = skip_ws(pos)
            if text.startswith("}", pos):
                pos += 1
                break
            if not text.startswith(",", pos):
                raise fail(pos, "expected ',' or '}'")
            pos = skip_ws(pos + 1)
    if skip_ws(pos) != len(text):
        raise fail(skip_ws(pos), "extra data after the object")
