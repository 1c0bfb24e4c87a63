"""Source-format readers: each turns a publisher's layout into items and interactions.

A format is a module of this package with a function
``open_reader(folder: Path, *, images: Path | None, progress: bool) -> Reader`` (see :mod:`.base`);
modules load only when their format is used. ``auto`` names no reader: :func:`detect` tells the format from the
folder's file names (see :data:`SIGNATURES`).
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
    "unisrec": "UniSRec / RecBole benchmark: NAME.{train,valid,test}.inter, NAME.item or NAME.text (+ NAME.item2index)",
    "lcrec": "LC-Rec JSON: NAME.inter.json, NAME.item.json",
}
AUTO = "auto"

SPLIT_INTER = ("*.test.inter", "*.valid.inter", "*.train.inter")
SIGNATURES: dict[str, tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]] = {
    # format: the file groups it needs; each (globs, excluded globs) must match at least one file of the folder
    "generic": ((("items.jsonl",), ()), (("interactions.csv",), ())),
    "recbole": ((("*.inter",), SPLIT_INTER), (("*.item",), ())),
    "unisrec": ((("*.test.inter",), ()), (("*.valid.inter",), ())),
    "lcrec": ((("*.inter.json", "*.inter.json.gz"), ()), (("*.item.json", "*.item.json.gz"), ())),
    "hm": ((("transactions_train.csv",), ()), (("articles.csv",), ())),
    "microlens": ((("*_pairs.tsv",), ()), (("*_titles.csv",), ())),
    "amazon2018": ((("meta_*.json", "meta_*.json.gz"), ()),),
    "amazon2023": ((("meta_*.jsonl", "meta_*.jsonl.gz"), ()),),
    "mind": ((("behaviors.tsv", "*/behaviors.tsv"), ()), (("news.tsv", "*/news.tsv"), ())),
}

__all__ = ["AUTO", "FORMATS", "RawInteraction", "RawItem", "Reader", "detect", "open_reader"]


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


def _matches(folder: Path, globs: tuple[str, ...], excluded: tuple[str, ...]) -> bool:
    return any(not any(p.match(x) for x in excluded) for g in globs for p in folder.glob(g) if p.is_file())


def detect(folder: str | Path) -> str:
    """The one format whose files ``folder`` holds (:data:`SIGNATURES`; PixelRec's CSVs are told by their headers);
    an :class:`InputError` listing what was found and the candidates when none or several fit."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"input folder {folder} does not exist")
    found = [name for name, groups in SIGNATURES.items() if all(_matches(folder, *group) for group in groups)]
    from .pixelrec import classify  # reads CSV headers: only this format needs more than file names

    inters, infos = classify(folder)
    if inters and infos:
        found.append("pixelrec")
    if len(found) == 1:
        return found[0]
    files = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(files[:12]) + (f" and {len(files) - 12} more" if len(files) > 12 else "") if files else "nothing"
    if found:
        raise InputError(f"{folder} fits several formats ({', '.join(found)}); pass one with --format (found {shown})")
    near = [f"{name} (lacks {' and '.join(lacks)})" for name, lacks in _partial(folder).items()]
    hint = f"; closest: {', '.join(near)}" if near else ""
    raise InputError(
        f"cannot tell the format of {folder}: found {shown}{hint}; pass --format, one of {', '.join(sorted(FORMATS))}"
    )


def _partial(folder: Path) -> dict[str, list[str]]:
    """Formats some but not all of whose file groups ``folder`` has, with what each lacks."""
    out = {}
    for name, groups in SIGNATURES.items():
        lacks = [" or ".join(globs) for globs, excluded in groups if not _matches(folder, globs, excluded)]
        if 0 < len(lacks) < len(groups):
            out[name] = lacks
    return out
