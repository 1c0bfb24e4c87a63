"""momrec's own input format, the one ``python -m shards synth`` writes.

One domain is a folder::

    items.jsonl        one JSON object per line: {"id": "...", <text fields>..., "image": "images/x.jpg"}
                       "id" (string or integer) is required; "image" (a path relative to the folder) is
                       optional; every other field is text (string, number, or list of them).
    interactions.csv   header "user,item,timestamp" ("timestamp" optional: unix seconds); one row per
                       interaction; rows of a user with equal timestamps keep their file order.
    images/            the image files items.jsonl points to (paths resolve against ``--images`` if given)

The default text template uses every text field in the line's order (``--text-template`` picks
fields, see :mod:`shards.text`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..errors import Skips
from .base import (
    RawInteraction,
    RawItem,
    parse_timestamp,
    read_csv,
    read_jsonl,
    require_file,
    resolve_image,
)

ITEMS_FILE = "items.jsonl"
INTERACTIONS_FILE = "interactions.csv"


class GenericReader:
    default_template: str | None = None

    def __init__(self, folder: Path, images: Path | None = None, progress: bool = False) -> None:
        self.folder = folder
        self.image_root = images or folder
        self.progress = progress
        self.items_path = require_file(folder, ITEMS_FILE, "items")
        self.interactions_path = require_file(folder, INTERACTIONS_FILE, "interactions")

    def items(self, skips: Skips) -> Iterator[RawItem]:
        name = ITEMS_FILE
        for line, obj in read_jsonl(self.items_path, skips, self.progress):
            item_id = obj.pop("id", None)
            if isinstance(item_id, int) and not isinstance(item_id, bool):
                item_id = str(item_id)
            if not isinstance(item_id, str) or not item_id.strip():
                skips.add(name, line, "id", f"missing or not a string: {item_id!r}")
                continue
            image = resolve_image(self.image_root, obj.pop("image", None), skips, name, line, "image")
            yield RawItem(id=item_id.strip(), fields=obj, image=image, file=name, line=line)

    def interactions(self, skips: Skips) -> Iterator[RawInteraction]:
        name = INTERACTIONS_FILE
        for line, row in read_csv(self.interactions_path, skips, ("user", "item"), progress=self.progress):
            user, item = row["user"].strip(), row["item"].strip()
            if not user or not item:
                skips.add(name, line, "user" if not user else "item", "empty value")
                continue
            stamp = None
            if "timestamp" in row:  # the column is optional; when present every row needs a value
                stamp = parse_timestamp(row["timestamp"].strip(), skips, name, line, "timestamp")
                if stamp is None:
                    continue
            yield RawInteraction(user=user, item=item, timestamp=stamp, file=name, line=line)


def open_reader(folder: Path, *, images: Path | None = None, progress: bool = False) -> GenericReader:
    return GenericReader(folder, images, progress)
