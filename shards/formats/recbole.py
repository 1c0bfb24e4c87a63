"""RecBole atomic files, the layout RecBole, UniSRec, VQ-Rec and MISSRec publish their datasets in.

One domain is a folder::

    NAME.inter   interactions: TSV with a typed header, e.g. ``user_id:token item_id:token rating:float
                 timestamp:float``; the folder holds exactly one ``*.inter`` file, and NAME is its stem.
    NAME.item    items: TSV with a typed header, e.g. ``item_id:token movie_title:token_seq
                 release_year:token class:token_seq plot:token_seq``.
    posters/     optional: ``<item_id>.jpg`` (or .jpeg, .png); ``--images`` names another folder of such files.

Every header cell is ``name:type`` with type ``token``, ``token_seq`` (space-separated tokens), ``float`` or
``float_seq``. Fields are separated by tabs and never quoted (a plot may begin with a quote character).

Field mapping:

- item id: the ``item_id`` column of both files (else the one ``token`` column the two headers share, as
  Yelp's ``business_id``);
- user: ``user_id`` of NAME.inter;
- time: ``timestamp`` of NAME.inter (unix seconds); without that column, file order is time order. Ties keep
  file order;
- text: the ``token`` and ``token_seq`` columns of NAME.item except ids (``item_id``, ``*_id``), as written;
  the default text puts the first column whose name contains ``title`` first, then the others in header
  order, each ending with a period (ml-100k: "Toy Story. 1995. Animation Children's Comedy. A little boy...");
  numeric columns (``float``, ``float_seq``) are not text;
- image: ``posters/<item_id>.jpg`` (or under ``--images``); an item without a file has no image.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, Skips
from .base import RawInteraction, RawItem, decoded_lines, find_image, parse_timestamp, require_file, require_one

TYPES = ("token", "token_seq", "float", "float_seq")
TEXT_TYPES = ("token", "token_seq")
IMAGES_FOLDER = "posters"


@dataclass(frozen=True)
class Column:
    name: str
    type: str


@dataclass(frozen=True)
class AtomicFile:
    """One atomic file: its path and its typed header (read when opened, so a bad header fails early)."""

    path: Path
    columns: tuple[Column, ...]

    @classmethod
    def open(cls, path: Path) -> AtomicFile:
        lines = decoded_lines(path, Skips())  # the first line only (the data rows are read again by rows())
        number, header = next(lines, (1, ""))
        lines.close()
        if number != 1:
            raise InputError("header is not UTF-8", file=path.name, line=1)
        if not header.strip():
            raise InputError("empty file: expected a typed header line like 'item_id:token'", file=path.name, line=1)
        return cls(path, tuple(_column(cell, path.name) for cell in header.split("\t")))

    def find(self, name: str) -> int | None:
        return next((i for i, c in enumerate(self.columns) if c.name == name), None)

    def require(self, name: str) -> int:
        index = self.find(name)
        if index is None:
            names = [c.name for c in self.columns]
            raise InputError(f"header {names} lacks column {name!r}", file=self.path.name, line=1, field=name)
        return index

    def rows(self, skips: Skips, progress: bool) -> Iterator[tuple[int, list[str]]]:
        """(line number, cells) of each data row; a row with the wrong number of cells is a counted skip."""
        width = len(self.columns)
        for number, text in decoded_lines(self.path, skips, progress):
            if number == 1 or not text.strip():
                continue
            cells = text.split("\t")
            if len(cells) != width:
                skips.add(self.path.name, number, None, f"malformed row: {len(cells)} fields, header has {width}")
                continue
            yield number, cells


def _column(cell: str, file: str) -> Column:
    name, sep, kind = cell.strip().rpartition(":")
    if not sep or not name or kind not in TYPES:
        raise InputError(f"header cell {cell!r} is not NAME:TYPE with TYPE one of {TYPES}", file=file, line=1)
    return Column(name, kind)


def _item_id_column(inter: AtomicFile, item: AtomicFile) -> str:
    """``item_id`` if both files have it, else the one token column they share."""
    if inter.find("item_id") is not None and item.find("item_id") is not None:
        return "item_id"
    inter_tokens = {c.name for c in inter.columns if c.type == "token"}
    shared = [c.name for c in item.columns if c.type == "token" and c.name in inter_tokens]
    if len(shared) != 1:
        raise InputError(
            f"cannot tell the item id column: expected 'item_id:token' in both {inter.path.name} and "
            f"{item.path.name}, or exactly one token column they share (shared: {shared})",
            file=item.path.name,
            line=1,
        )
    return shared[0]


def text_columns(item: AtomicFile, id_column: str) -> list[tuple[int, str]]:
    """(index, name) of the text columns: token and token_seq columns except ids; the first 'title' one first."""
    found = [
        (i, c.name)
        for i, c in enumerate(item.columns)
        if c.type in TEXT_TYPES and c.name != id_column and not c.name.endswith("_id")
    ]
    titles = [col for col in found if "title" in col[1].lower()][:1]
    return titles + [col for col in found if col not in titles]


class RecBoleReader:
    default_template: str | None = None  # every text field, in text_columns' order (title first)

    def __init__(self, folder: Path, images: Path | None = None, progress: bool = False) -> None:
        self.progress = progress
        self.inter = AtomicFile.open(require_one(folder, "*.inter", "RecBole interactions"))
        name = self.inter.path.stem
        self.item = AtomicFile.open(require_file(folder, f"{name}.item", "RecBole items"))
        self.id_column = _item_id_column(self.inter, self.item)
        self.user_index = self.inter.require("user_id")
        self.item_index = self.inter.require(self.id_column)
        self.time_index = self.inter.find("timestamp")
        self.text = text_columns(self.item, self.id_column)
        image_root = images or folder / IMAGES_FOLDER
        self.image_root = image_root if image_root.is_dir() else None

    def items(self, skips: Skips) -> Iterator[RawItem]:
        name, id_index = self.item.path.name, self.item.require(self.id_column)
        for line, cells in self.item.rows(skips, self.progress):
            item_id = cells[id_index].strip()
            if not item_id:
                skips.add(name, line, self.id_column, "empty value")
                continue
            fields = {column: cells[i].strip() or None for i, column in self.text}
            image = find_image(self.image_root, item_id) if self.image_root else None
            yield RawItem(id=item_id, fields=fields, image=image, file=name, line=line)

    def interactions(self, skips: Skips) -> Iterator[RawInteraction]:
        name = self.inter.path.name
        for line, cells in self.inter.rows(skips, self.progress):
            user, item = cells[self.user_index].strip(), cells[self.item_index].strip()
            if not user or not item:
                skips.add(name, line, "user_id" if not user else self.id_column, "empty value")
                continue
            stamp = None
            if self.time_index is not None:  # the column is optional; when present every row needs a value
                stamp = parse_timestamp(cells[self.time_index].strip(), skips, name, line, "timestamp")
                if stamp is None:
                    continue
            yield RawInteraction(user=user, item=item, timestamp=stamp, file=name, line=line)


def open_reader(folder: Path, *, images: Path | None = None, progress: bool = False) -> RecBoleReader:
    return RecBoleReader(folder, images, progress)
