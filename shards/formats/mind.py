"""MIND, the Microsoft News Dataset (Wu et al., ACL 2020): MINDsmall / MINDlarge, one split per folder.

Layout (tab-separated, no header; the folder holds both files directly, e.g. ``MINDsmall_train/``; a
folder holding only split subfolders such as ``train/`` and ``dev/`` is refused with a hint to pass one)::

    behaviors.tsv   impression_id, user_id, time ("11/15/2019 8:55:22 AM"), history (space-separated news
                    ids, oldest first; may be empty), impressions (space-separated "N123-1" clicked /
                    "N456-0" not clicked)
    news.tsv        news_id, category, subcategory, title, abstract, url, title_entities, abstract_entities

No images: MIND is a text-only domain (``--images`` is refused).

Field mapping: item id = ``news_id``; user = ``user_id``; text = ``title``, ``category``, ``subcategory``,
``abstract`` by the template below; image = none. A user's sequence is their click history, then the news
they clicked (``-1``) in their impressions, in time order; not-clicked (``-0``) and unlabelled impressions
(the test split has no labels) are not interactions.

Time: the impression ``time``, read as UTC (the release gives no zone), in unix seconds. The history repeats
in every behaviors row of a user; it is taken once, from the user's earliest row (by time; ties: the first
in the file). History clicks have no time: the i-th of n history items (0-based) gets the earliest
impression's time minus (n - i) seconds, so the builder's time sort keeps the history in its order and
before every impression click. Finding each user's earliest row takes one extra pass over behaviors.tsv
(streamed; it keeps the line number of each user's earliest row).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..errors import InputError, Skips
from .base import RawInteraction, RawItem, decoded_lines, require_file

BEHAVIORS_FILE = "behaviors.tsv"
NEWS_FILE = "news.tsv"
NEWS_COLUMNS = ("news_id", "category", "subcategory", "title", "abstract", "url", "title_entities", "abstract_entities")
TEXT_COLUMNS = ("category", "subcategory", "title", "abstract")
_TIME = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4}) (\d{1,2}):(\d{2}):(\d{2}) ([AP]M)")


def parse_time(text: str) -> float | None:
    """Unix seconds (UTC) of a MIND time like ``11/15/2019 8:55:22 AM``; None if it is not one."""
    m = _TIME.fullmatch(text.strip())
    if m is None:
        return None
    month, day, year, hour, minute, second = (int(g) for g in m.groups()[:6])
    if not 1 <= hour <= 12:
        return None
    hour = hour % 12 + (12 if m.group(7) == "PM" else 0)
    try:  # datetime checks the rest: year 0, month 13, February 30, minute 60 are no times
        return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class _Row:
    user: str
    time: float
    history: list[str]
    impressions: list[str]


def _parse_row(text: str) -> _Row | tuple[str | None, str]:
    """A behaviors row, or (field, reason) saying why it is unusable."""
    parts = text.split("\t")
    if len(parts) != 5:
        return None, f"malformed row: {len(parts)} fields, expected 5"
    _, user, time, history, impressions = (p.strip() for p in parts)
    if not user:
        return "user_id", "empty value"
    stamp = parse_time(time)
    if stamp is None:
        return "time", f"malformed time: {time!r}"
    return _Row(user, stamp, history.split(), impressions.split())


def _clicked(tokens: list[str]) -> tuple[list[str], list[str]]:
    """The clicked news ids of an impression list, and the malformed tokens."""
    clicked, bad = [], []
    for token in tokens:
        news, dash, label = token.rpartition("-")
        if not dash:
            continue  # unlabelled (test split): not an interaction
        if not news or label not in ("0", "1"):
            bad.append(token)
        elif label == "1":
            clicked.append(news)
    return clicked, bad


def _check_folder(folder: Path) -> None:
    if (folder / BEHAVIORS_FILE).is_file() or not any(folder.glob(f"*/{BEHAVIORS_FILE}")):
        return
    splits = sorted(p.parent.name for p in folder.glob(f"*/{BEHAVIORS_FILE}"))
    raise InputError(
        f"{folder} holds no {BEHAVIORS_FILE} itself, but its subfolders {', '.join(splits)} do: "
        "pass one split folder (e.g. the train split) as the input"
    )


class MindReader:
    default_template: str | None = "{title}.|{category}, {subcategory}.|{abstract}"

    def __init__(self, folder: Path, images: Path | None = None, progress: bool = False) -> None:
        if images is not None:
            raise InputError("the mind format has no images (MIND is text-only): drop --images")
        _check_folder(folder)
        self.progress = progress
        self.behaviors_path = require_file(folder, BEHAVIORS_FILE, "MIND behaviors")
        self.news_path = require_file(folder, NEWS_FILE, "MIND news")

    def items(self, skips: Skips) -> Iterator[RawItem]:
        name = self.news_path.name
        for line, text in decoded_lines(self.news_path, skips, self.progress):
            if not text.strip():
                continue
            parts = text.split("\t")
            if len(parts) != len(NEWS_COLUMNS):
                skips.add(name, line, None, f"malformed row: {len(parts)} fields, expected {len(NEWS_COLUMNS)}")
                continue
            row = dict(zip(NEWS_COLUMNS, (p.strip() for p in parts)))
            if not row["news_id"]:
                skips.add(name, line, "news_id", "empty value")
                continue
            fields = {c: row[c] for c in TEXT_COLUMNS}
            yield RawItem(id=row["news_id"], fields=fields, image=None, file=name, line=line)

    def _earliest_rows(self) -> set[int]:
        """Line numbers of each user's earliest behaviors row (first pass; its skips are counted by the second)."""
        earliest: dict[str, tuple[float, int]] = {}
        for line, text in decoded_lines(self.behaviors_path, Skips(), self.progress):
            row = _parse_row(text) if text.strip() else None
            if isinstance(row, _Row) and (row.user not in earliest or row.time < earliest[row.user][0]):
                earliest[row.user] = (row.time, line)
        return {line for _, line in earliest.values()}

    def interactions(self, skips: Skips) -> Iterator[RawInteraction]:
        name = self.behaviors_path.name
        earliest = self._earliest_rows()
        for line, text in decoded_lines(self.behaviors_path, skips, self.progress):
            if not text.strip():
                continue
            row = _parse_row(text)
            if not isinstance(row, _Row):
                skips.add(name, line, *row)
                continue
            if line in earliest:
                n = len(row.history)
                for i, news in enumerate(row.history):
                    yield RawInteraction(row.user, news, row.time - (n - i), file=name, line=line)
            clicked, bad = _clicked(row.impressions)
            if bad:
                skips.add(name, line, "impressions", f"malformed impression: {bad[0]!r} ({len(bad)} in this row)")
            for news in clicked:
                yield RawInteraction(row.user, news, row.time, file=name, line=line)


def open_reader(folder: Path, *, images: Path | None = None, progress: bool = False) -> MindReader:
    return MindReader(folder, images, progress)
