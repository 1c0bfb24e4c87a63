"""Source-format readers: each turns a publisher's layout into items and interactions.

A format is a module of this package with a function
``open_reader(folder: Path, *, images: Path | None, progress: bool) -> Reader`` (see :mod:`.base`);
modules load only when their format is used.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import InputError
from .base import RawInteraction, RawItem, Reader

FORMATS: dict[str, str] = {
    "generic": "momrec's own layout: items.jsonl, interactions.csv, images/",
    "recbole": "RecBole atomic files: NAME.inter, NAME.item (+ posters/ID.jpg)",
    "hm": "H&M Kaggle: transactions_train.csv, articles.csv, images/0XX/ID.jpg",
    "microlens": "MicroLens: *_pairs.tsv, *_titles.csv (+ covers/ID.jpg)",
    "amazon2018": "Amazon reviews 2018: ratings CSV or 5-core JSON lines, meta_CATEGORY.json (gz or not)",
    "amazon2023": "Amazon reviews 2023: CATEGORY.jsonl, meta_CATEGORY.jsonl",
    "mind": "MIND: behaviors.tsv, news.tsv",
    "pixelrec": "PixelRec / NineRec: interactions CSV, item info CSV, cover/ID.jpg",
}

__all__ = ["FORMATS", "RawInteraction", "RawItem", "Reader", "open_reader"]


def open_reader(name: str, folder: str | Path, *, images: str | Path | None = None, progress: bool = False) -> Reader:
    """The reader for format ``name`` over ``folder`` (an :class:`InputError` if either is wrong)."""
    if name not in FORMATS:
        raise InputError(f"unknown format {name!r}; known formats: {', '.join(sorted(FORMATS))}")
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"input folder {folder} does not exist")
    if images is not None and not Path(images).is_dir():
        raise InputError(f"image folder {images} does not exist")
    module = importlib.import_module(f".{name}", __name__)
    return module.open_reader(folder, images=None if images is None else Path(images), progress=progress)
