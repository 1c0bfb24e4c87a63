"""Amazon review data, 2018 release (Ni, Li and McAuley, EMNLP 2019), one category per folder.

Layout (any file may be gzipped, ``.gz`` or not; gzip is recognised by its content)::

    meta_<Category>.json      item metadata, one object per line: asin, title, brand, category [list],
                              feature [list], description [list or str], imageURL, imageURLHighRes, ...
    and exactly one interaction file, either
    <Category>.csv            ratings only, no header: item,user,rating,timestamp
    ratings_<Category>.csv    the 2014 release's ratings only, no header: user,item,rating,timestamp
    <Category>_5.json         reviews (the 5-core, or the full <Category>.json), one JSON object per line:
                              reviewerID, asin, overall, unixReviewTime, reviewText, ...
    images/<asin>.jpg         optional local item images (or ``--images DIR`` holding <asin>.jpg); imageURL is
                              never downloaded

Field mapping: item id = ``asin``; user = ``reviewerID`` (CSV: the user column); time = ``unixReviewTime``
(CSV: the timestamp column), unix seconds; the rating is not used (every rating is an interaction); text
= the meta fields by the template below; image = ``images/<asin>.jpg`` if present.

Meta quirks: some meta files hold Python dict reprs (single quotes) instead of JSON: a line that is not JSON
is parsed with :func:`ast.literal_eval` (literals only, nothing runs); a line that is neither is a counted skip.
The title may be missing or empty (the item is kept; its text comes from the other fields). HTML is
stripped from every text field by a regex (``<...>`` becomes a space, entities like ``&amp;`` are
unescaped): minimal, not an HTML parser. A description given as a list of paragraphs is joined with spaces.
Image URL fields are dropped; every other meta field can be named in ``--text-template``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import safejson
from ..errors import Skips
from ..safejson import MAX_JSON_DEPTH, JSONProblem, json_depth
from .base import (
    FieldValue,
    RawInteraction,
    RawItem,
    clean_text,
    decoded_lines,
    find_image,
    parse_timestamp,
    read_jsonl,
    require_one,
)

META_PATTERNS = ("meta_*.json", "meta_*.json.gz")
INTERACTION_PATTERNS = ("*.csv", "*.csv.gz", "*.json", "*.json.gz")
DROPPED_FIELDS = ("asin", "imageURL", "imageURLHighRes", "imUrl")


def text_fields(obj: dict[str, Any], dropped: tuple[str, ...]) -> dict[str, FieldValue]:
    """The template's fields: every key but ``dropped``, HTML-cleaned, a list description joined into one text."""
    fields = {k: clean_text(v) for k, v in obj.items() if k not in dropped}
    description = fields.get("description")
    if isinstance(description, list) and all(isinstance(d, str) for d in description):
        fields["description"] = " ".join(d for d in description if d.strip())
    return fields


def json_time(value: Any, per_second: int, skips: Skips, file: str, line: int, field: str) -> float | None:
    """Seconds from a JSON number (or numeric string) in units of 1/``per_second`` s; None with a counted skip."""
    if value is None:
        skips.add(file, line, field, "missing timestamp")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        skips.add(file, line, field, f"malformed timestamp: {value!r}")
        return None
    stamp = parse_timestamp(str(value).strip(), skips, file, line, field)
    return None if stamp is None else stamp / per_second


def json_id(obj: dict[str, Any], key: str, skips: Skips, file: str, line: int) -> str | None:
    """``obj[key]`` as a non-empty string (integers accepted), or None with a counted skip."""
    value = obj.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        skips.add(file, line, key, f"missing or not a string: {value!r}")
        return None
    return value.strip()


def _parse_object(text: str) -> Any:
    """JSON (:func:`shards.safejson.loads`), else a Python literal (the 2014-style meta lines); None if neither,
    or if nested deeper than MAX_JSON_DEPTH (its fields are cleaned recursively) or holding a number too long to
    convert."""
    try:
        return safejson.loads(text)
    except JSONProblem:
        pass
    try:
        value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return None if json_depth(value) > MAX_JSON_DEPTH else value


def read_meta(path: Path, skips: Skips, progress: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    """Meta objects, one per line, as JSON or as Python dict literals; anything else is a counted skip."""
    for number, text in decoded_lines(path, skips, progress):
        if not text.strip():
            continue
        obj = _parse_object(text)
        if not isinstance(obj, dict):
            skips.add(path.name, number, None, "malformed line: neither a JSON object nor a Python dict literal")
            continue
        yield number, obj


def _is_csv(path: Path) -> bool:
    return path.name.endswith((".csv", ".csv.gz"))


class Amazon2018Reader:
    default_template: str | None = "{title}.|Brand: {brand}.|Categories: {category}.|{feature}|{description}"

    def __init__(self, folder: Path, images: Path | None = None, progress: bool = False) -> None:
        self.progress = progress
        self.meta_path = require_one(folder, META_PATTERNS, "item meta")
        self.inter_path = require_one(folder, INTERACTION_PATTERNS, "ratings or reviews", exclude="meta_*")
        root = images or folder / "images"
        self.image_root = root if root.is_dir() else None

    def items(self, skips: Skips) -> Iterator[RawItem]:
        name = self.meta_path.name
        for line, obj in read_meta(self.meta_path, skips, self.progress):
            asin = json_id(obj, "asin", skips, name, line)
            if asin is None:
                continue
            image = find_image(self.image_root, asin) if self.image_root else None
            yield RawItem(id=asin, fields=text_fields(obj, DROPPED_FIELDS), image=image, file=name, line=line)

    def interactions(self, skips: Skips) -> Iterator[RawInteraction]:
        return self._ratings(skips) if _is_csv(self.inter_path) else self._reviews(skips)

    def _reviews(self, skips: Skips) -> Iterator[RawInteraction]:
        name = self.inter_path.name
        for line, obj in read_jsonl(self.inter_path, skips, self.progress):
            user = json_id(obj, "reviewerID", skips, name, line)
            item = None if user is None else json_id(obj, "asin", skips, name, line)
            if user is None or item is None:
                continue
            stamp = json_time(obj.get("unixReviewTime"), 1, skips, name, line, "unixReviewTime")
            if stamp is not None:
                yield RawInteraction(user=user, item=item, timestamp=stamp, file=name, line=line)

    def _ratings(self, skips: Skips) -> Iterator[RawInteraction]:
        name = self.inter_path.name
        columns = ("user", "item") if name.startswith("ratings_") else ("item", "user")  # 2014 vs 2018 order
        for line, text in decoded_lines(self.inter_path, skips, self.progress):
            if not text.strip():
                continue
            row = text.split(",")
            if len(row) != 4:
                skips.add(name, line, None, f"malformed row: {len(row)} fields, expected 4 ({','.join(columns)},...)")
                continue
            values = dict(zip(columns, (row[0].strip(), row[1].strip())))
            empty = [c for c in columns if not values[c]]
            if empty:
                skips.add(name, line, empty[0], "empty value")
                continue
            stamp = parse_timestamp(row[3].strip(), skips, name, line, "timestamp")
            if stamp is not None:
                yield RawInteraction(values["user"], values["item"], stamp, file=name, line=line)


def open_reader(folder: Path, *, images: Path | None = None, progress: bool = False) -> Amazon2018Reader:
    return Amazon2018Reader(folder, images, progress)
