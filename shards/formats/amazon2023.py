"""Amazon Reviews 2023 (McAuley Lab, Hou et al. 2024), one category per folder.

Layout (either file may be gzipped, ``.gz`` or not; gzip is recognised by its content)::

    <Category>.jsonl        reviews, one JSON object per line: user_id, parent_asin, asin, rating,
                            timestamp (unix MILLISECONDS), title, text, images, helpful_vote, verified_purchase
    meta_<Category>.jsonl   item metadata, one object per line: parent_asin, title, main_category, store,
                            categories [list], features [list], description [list], details {object},
                            images [{thumb, large, hi_res, variant}], videos, average_rating, price, ...
    images/<parent_asin>.jpg  optional local item images (or ``--images DIR``); image URLs are never downloaded

Field mapping: item id = ``parent_asin`` (reviews and meta alike, as the release recommends: variants of one
product share it); user = ``user_id``; time = ``timestamp`` / 1000, unix seconds; the rating is not used
(every review is an interaction); text = the meta fields by the template below; image =
``images/<parent_asin>.jpg`` if present.

Text: HTML is stripped as in :mod:`.amazon2018` (regex, minimal); the description (a list of paragraphs) is
joined with spaces. ``images`` and ``videos`` are dropped; ``details`` (an object) is not in the default
template, and naming it in ``--text-template`` gives a counted wrong-type skip per item.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..errors import Skips
from .amazon2018 import json_id, json_time, text_fields
from .base import RawInteraction, RawItem, find_image, read_jsonl, require_one

META_PATTERNS = ("meta_*.jsonl", "meta_*.jsonl.gz")
REVIEW_PATTERNS = ("*.jsonl", "*.jsonl.gz")
DROPPED_FIELDS = ("parent_asin", "images", "videos")
MS_PER_SECOND = 1000


class Amazon2023Reader:
    default_template: str | None = "{title}.|Store: {store}.|Categories: {categories}.|{features}|{description}"

    def __init__(self, folder: Path, images: Path | None = None, progress: bool = False) -> None:
        self.progress = progress
        self.meta_path = require_one(folder, META_PATTERNS, "item meta")
        self.reviews_path = require_one(folder, REVIEW_PATTERNS, "reviews", exclude="meta_*")
        root = images or folder / "images"
        self.image_root = root if root.is_dir() else None

    def items(self, skips: Skips) -> Iterator[RawItem]:
        name = self.meta_path.name
        for line, obj in read_jsonl(self.meta_path, skips, self.progress):
            item = json_id(obj, "parent_asin", skips, name, line)
            if item is None:
                continue
            image = find_image(self.image_root, item) if self.image_root else None
            yield RawItem(id=item, fields=text_fields(obj, DROPPED_FIELDS), image=image, file=name, line=line)

    def interactions(self, skips: Skips) -> Iterator[RawInteraction]:
        name = self.reviews_path.name
        for line, obj in read_jsonl(self.reviews_path, skips, self.progress):
            user = json_id(obj, "user_id", skips, name, line)
            item = None if user is None else json_id(obj, "parent_asin", skips, name, line)
            if user is None or item is None:
                continue
            stamp = json_time(obj.get("timestamp"), MS_PER_SECOND, skips, name, line, "timestamp")
            if stamp is not None:
                yield RawInteraction(user=user, item=item, timestamp=stamp, file=name, line=line)


def open_reader(folder: Path, *, images: Path | None = None, progress: bool = False) -> Amazon2023Reader:
    return Amazon2023Reader(folder, images, progress)
