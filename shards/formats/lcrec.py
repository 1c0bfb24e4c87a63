"""LC-Rec's JSON layout, which LC-Rec, LETTER and many generative recommenders ship their Amazon datasets in.

One domain is a folder::

    NAME.inter.json   {"USER": [ITEM, ITEM, ...], ...}: each user's items, oldest first (item ids as JSON
                      numbers or strings; user ids are the object's keys). No timestamps.
    NAME.item.json    {"ITEM": {"title": ..., "description": ..., "brand": ..., "categories": ...}, ...}
                      (``categories`` is one comma-separated string; any field may be empty or absent).
    images/           optional: ``<ITEM>.jpg`` (or .jpeg, .png); ``--images`` names another folder of such files.

The folder holds exactly one ``*.inter.json``; NAME is its name without ``.inter.json``. Both files may be gzip'd
under the same names.

**The split is the published one**: LC-Rec holds out each user's last item for test and the one before it for
validation, which is momrec's leave-one-out, so the builder keeps every user and every item as the files give them
(no k-core filter, no truncation, unless ``--min-user-interactions``, ``--min-item-interactions`` or
``--max-seq-len`` ask for one; the manifest's ``split`` says whether the published targets survived).

Field mapping: item id = the keys of NAME.item.json, as strings (``7`` and ``"7"`` are the same item); user = the
keys of NAME.inter.json; text = the item's fields, by default ``{title}. Brand: {brand}. Categories: {categories}.
{description}`` (LC-Rec's item features); other fields of an item are available to ``--text-template``.

Bad input: a member of NAME.item.json that is not an object, or a sequence that is not a list of item ids, is a
counted skip; a user whose sequence names an item NAME.item.json lacks is left out whole (a counted skip naming the
item): dropping one interaction would move the user's published targets. A syntax error in either file makes it
unusable: an error naming the line and column.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import Skips
from .base import RawInteraction, RawItem, clean_text, find_image, read_json_object, require_one

INTER_SUFFIX = ".inter.json"
ITEM_SUFFIX = ".item.json"
IMAGES_FOLDER = "images"
TEMPLATE = "{title}.|Brand: {brand}.|Categories: {categories}.|{description}"


def item_id(value: Any) -> str | None:
    """An item id as the shards write it: a non-empty string, or an integer as its decimal text; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


class LCRecReader:
    default_template: str | None = TEMPLATE
    published_split = True

    def __init__(self, folder: Path, images: Path | None = None, progress: bool = False) -> None:
        self.inter_path = require_one(folder, [f"*{INTER_SUFFIX}", f"*{INTER_SUFFIX}.gz"], "LC-Rec interactions")
        name = self.inter_path.name.split(INTER_SUFFIX)[0]
        self.item_path = require_one(folder, [f"{name}{ITEM_SUFFIX}", f"{name}{ITEM_SUFFIX}.gz"], "LC-Rec items")
        image_root = images or folder / IMAGES_FOLDER
        self.image_root = image_root if image_root.is_dir() else None
        self.known: set[str] = set()

    def items(self, skips: Skips) -> Iterator[RawItem]:
        name = self.item_path.name
        for line, key, value in read_json_object(self.item_path):
            if not key.strip():
                skips.add(name, line, None, "empty item id")
                continue
            if not isinstance(value, dict):
                skips.add(name, line, key, f"malformed item: expected an object, got {type(value).__name__}")
                continue
            self.known.add(key.strip())
            image = find_image(self.image_root, key.strip()) if self.image_root else None
            yield RawItem(id=key.strip(), fields=clean_text(value), image=image, file=name, line=line)

    def interactions(self, skips: Skips) -> Iterator[RawInteraction]:
        name, seen = self.inter_path.name, set()
        for line, user, value in read_json_object(self.inter_path):
            sequence = self._sequence(user, value, seen, skips, line)
            if sequence is None:
                continue
            seen.add(user)
            for item in sequence:
                yield RawInteraction(user=user, item=item, timestamp=None, file=name, line=line)

    def _sequence(self, user: str, value: Any, seen: set[str], skips: Skips, line: int) -> list[str] | None:
        """The user's item ids, or None with a counted skip (the whole user: its split must stay intact)."""
        name = self.inter_path.name
        if not user.strip():
            skips.add(name, line, None, "empty user id")
            return None
        if user in seen:
            skips.add(name, line, user, "duplicate user: its first sequence is kept")
            return None
        if not isinstance(value, list):
            skips.add(name, line, user, f"malformed sequence: expected a list of item ids, got {type(value).__name__}")
            return None
        ids = [item_id(v) for v in value]
        bad = [v for v, i in zip(value, ids) if i is None]
        if bad:
            skips.add(name, line, user, f"malformed sequence: {bad[0]!r} is not an item id (the user is left out)")
            return None
        missing = next((i for i in ids if i not in self.known), None)
        if missing is not None:
            why = f"unknown item: {missing!r} is not in {self.item_path.name} (the user is left out)"
            skips.add(name, line, user, why)
            return None
        return ids  # type: ignore[return-value]


def open_reader(folder: Path, *, images: Path | None = None, progress: bool = False) -> LCRecReader:
    return LCRecReader(folder, images, progress)
