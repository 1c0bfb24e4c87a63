"""PixelRec (Cheng et al. 2023) and NineRec-style layouts: interactions CSV, item info CSV, covers.

Layout (CSV files with a header, gzipped or not; in the folder itself or one subfolder down, since the
publisher ships both CSVs under the same name, e.g. ``Pixel200K.csv``, in separate folders)::

    <any>.csv        interactions, header ``item_id,user_id,timestamp`` (e.g. pixelrec_interaction/Pixel200K.csv)
    <any>.csv        item info, header with ``item_id`` and ``title``, e.g. ``item_id,view_number,
                     comment_number,thumbup_number,share_number,coin_number,favorite_number,barrage_number,
                     title,tag,description`` (e.g. pixelrec_iteminfo/Pixel200K.csv or item_info.csv)
    cover/<item_id>.jpg  item cover images (or ``--images DIR``)

The two CSVs are told apart by their headers, not their names: the interactions file is the one with a
``user_id`` column; the item info file has ``title`` and no ``user_id``. Exactly one of each must be found
(an :class:`InputError` lists the candidates otherwise: keep one size, e.g. Pixel200K, per folder).

Field mapping: item id = ``item_id``; user = ``user_id``; time = ``timestamp`` (unix seconds; when the
column is absent, file order); text = ``title``, ``tag``, ``description`` by the template below (every
other item info column can be named in ``--text-template``); image = ``cover/<item_id>.jpg`` if present.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError, Skips
from .base import RawInteraction, RawItem, decoded_lines, find_image, parse_timestamp, read_csv

CSV_PATTERNS = ("*.csv", "*.csv.gz", "*/*.csv", "*/*.csv.gz")
INTERACTION_COLUMNS = ("item_id", "user_id")
ITEM_COLUMNS = ("item_id", "title")
COVER_FOLDER = "cover"


def _header(path: Path) -> list[str]:
    """The column names of a CSV file's first line (empty for an empty or unreadable file)."""
    for _, text in decoded_lines(path, Skips()):
        try:
            return [h.strip() for h in next(csv.reader([text]), [])]
        except csv.Error:  # e.g. a lone carriage return: no header this reader can use
            return []
    return []


def classify(folder: Path) -> tuple[list[Path], list[Path]]:
    """Candidate (interaction files, item info files) among the CSVs of the folder and its subfolders."""
    inters, infos = [], []
    for path in sorted({p for pat in CSV_PATTERNS for p in folder.glob(pat) if p.is_file()}):
        header = _header(path)
        if all(c in header for c in INTERACTION_COLUMNS):
            inters.append(path)
        elif all(c in header for c in ITEM_COLUMNS):
            infos.append(path)
    return inters, infos


def _only(found: list[Path], folder: Path, what: str, columns: tuple[str, ...]) -> Path:
    if len(found) == 1:
        return found[0]
    names = ", ".join(str(p.relative_to(folder)) for p in found) or "none"
    raise InputError(
        f"expected one {what} CSV (a header with {', '.join(columns)}) in {folder} or its subfolders, found {names}"
    )


class PixelRecReader:
    default_template: str | None = "{title}.|Tags: {tag}.|{description}"

    def __init__(self, folder: Path, images: Path | None = None, progress: bool = False) -> None:
        self.progress = progress
        inters, infos = classify(folder)
        self.inter_path = _only(inters, folder, "interactions", INTERACTION_COLUMNS)
        self.info_path = _only(infos, folder, "item info", ITEM_COLUMNS)
        root = images or folder / COVER_FOLDER
        self.image_root = root if root.is_dir() else None

    def items(self, skips: Skips) -> Iterator[RawItem]:
        name = self.info_path.name
        for line, row in read_csv(self.info_path, skips, ITEM_COLUMNS, progress=self.progress):
            item = row.pop("item_id").strip()
            if not item:
                skips.add(name, line, "item_id", "empty value")
                continue
            image = find_image(self.image_root, item) if self.image_root else None
            yield RawItem(id=item, fields=dict(row), image=image, file=name, line=line)

    def interactions(self, skips: Skips) -> Iterator[RawInteraction]:
        name = self.inter_path.name
        for line, row in read_csv(self.inter_path, skips, INTERACTION_COLUMNS, progress=self.progress):
            user, item = row["user_id"].strip(), row["item_id"].strip()
            if not user or not item:
                skips.add(name, line, "user_id" if not user else "item_id", "empty value")
                continue
            stamp = None
            if "timestamp" in row:
                stamp = parse_timestamp(row["timestamp"].strip(), skips, name, line, "timestamp")
                if stamp is None:
                    continue
            yield RawInteraction(user=user, item=item, timestamp=stamp, file=name, line=line)


def open_reader(folder: Path, *, images: Path | None = None, progress: bool = False) -> PixelRecReader:
    return PixelRecReader(folder, images, progress)
