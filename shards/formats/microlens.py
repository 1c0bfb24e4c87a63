"""MicroLens short-video recommendation data, as its authors publish it (MicroLens-50k, -100k, -1M).

One domain is a folder::

    <NAME>_pairs.tsv    one line per user: ``user<TAB>item item item ...``, oldest first, no timestamps
    <NAME>_titles.csv   ``item,title`` with a header; titles contain commas and quotes (CSV quoting)
    covers/             optional: ``<item>.jpg`` (or .jpeg, .png); ``--images`` names another folder of such files

The folder holds exactly one ``*_pairs.tsv`` and one ``*_titles.csv``.

Field mapping:

- item id: ``item`` of the titles file (the ids of the pairs file);
- user: the first cell of a pairs line;
- time: none; each line's item order is the time order (a user on several lines: line order);
- text: ``title`` (default template ``{title}``; any other titles-file column can be named in ``--text-template``);
- image: ``covers/<item>.jpg``; an item without a file has no image (MicroLens-50k ships no covers).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..errors import Skips
from .base import RawInteraction, RawItem, decoded_lines, find_image, read_csv, require_one

PAIRS_PATTERN = "*_pairs.tsv"
TITLES_PATTERN = "*_titles.csv"
IMAGES_FOLDER = "covers"


class MicroLensReader:
    default_template: str | None = "{title}"

    def __init__(self, folder: Path, images: Path | None = None, progress: bool = False) -> None:
        self.progress = progress
        self.pairs_path = require_one(folder, PAIRS_PATTERN, "MicroLens user sequences")
        self.titles_path = require_one(folder, TITLES_PATTERN, "MicroLens titles")
        image_root = images or folder / IMAGES_FOLDER
        self.image_root = image_root if image_root.is_dir() else None

    def items(self, skips: Skips) -> Iterator[RawItem]:
        name = self.titles_path.name
        for line, row in read_csv(self.titles_path, skips, ("item", "title"), progress=self.progress):
            item_id = row.pop("item").strip()
            if not item_id:
                skips.add(name, line, "item", "empty value")
                continue
            fields = {"title": row.pop("title"), **row}
            image = find_image(self.image_root, item_id) if self.image_root else None
            yield RawItem(id=item_id, fields=fields, image=image, file=name, line=line)

    def interactions(self, skips: Skips) -> Iterator[RawInteraction]:
        name = self.pairs_path.name
        for line, text in decoded_lines(self.pairs_path, skips, self.progress):
            if not text.strip():
                continue
            cells = text.split("\t")
            if len(cells) != 2:
                skips.add(name, line, None, f"malformed row: {len(cells)} fields, expected 'user<TAB>items'")
                continue
            user, items = cells[0].strip(), cells[1].split()
            if not user or not items:
                skips.add(name, line, "user" if not user else "items", "empty value")
                continue
            for item in items:
                yield RawInteraction(user=user, item=item, timestamp=None, file=name, line=line)


def open_reader(folder: Path, *, images: Path | None = None, progress: bool = False) -> MicroLensReader:
    return MicroLensReader(folder, images, progress)
