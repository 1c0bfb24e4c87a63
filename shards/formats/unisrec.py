"""The UniSRec / RecBole benchmark layout: UniSRec, VQ-Rec, MISSRec and LLMRank ship their Amazon datasets this way.

One domain is a folder (RecBole's ``benchmark_filename = [train, valid, test]``)::

    NAME.test.inter    TSV, typed header ``user_id:token  item_id_list:token_seq  item_id:token``: one row per
                       user, its history (space-separated item ids, oldest first) and its test target.
    NAME.valid.inter   the same, one step earlier: the history and the validation target.
    NAME.train.inter   optional: a row per training prediction (every shorter prefix); checked, not needed.
    NAME.item          item text: TSV with a typed header, ``item_id:token`` and text columns (``title``,
                       ``brand``, ``categories``, ...);
    or NAME.text       UniSRec's variant: ``item_id:token  text:token_seq``, the text already joined.
    NAME.item2index    optional: ``RAW_ID<TAB>INDEX`` per line (no header), the raw ids (ASINs) of the item
                       indices the other files use; with it, the shards' item ids are the raw ids, so one product
                       has one id in every layout.
    NAME.user2index    optional: the same for users.
    images/            optional: ``<ITEM>.jpg`` (or .jpeg, .png; named by the shards' item id); ``--images`` elsewhere.

The folder holds exactly one ``*.test.inter``; NAME is its name without ``.test.inter``. With both NAME.item and
NAME.text, NAME.item is read.

**The split is the published one.** A user's sequence is rebuilt as its test history plus its test target, so the
shards' last two items are the files' validation and test targets for every user; the builder keeps every user and
every item as the files give them (no k-core filter, no truncation, unless ``--min-user-interactions``,
``--min-item-interactions`` or ``--max-seq-len`` ask for one; the manifest's ``split`` says whether the published
targets survived). Where histories are capped windows, a validation history one item longer than the test history
less its last item contributes that older item.

Consistency, checked user by user (each failure is a counted skip naming file, line and field):

- a user of NAME.test.inter missing from NAME.valid.inter, or the other way round: the user is left out;
- a test history that is not the validation history plus the validation target: the user is left out;
- an item id with no row in NAME.item / NAME.text (or, with NAME.item2index, no raw id): the user is left out,
  since dropping one interaction would move the published targets;
- a row of NAME.train.inter whose history and target are not a run of the user's sequence before its validation
  target, or whose user has no test row: that row is reported (the shards do not use NAME.train.inter).

Default text: UniSRec's item features, ``{title}. Brand: {brand}. Categories: {categories}.`` (``category`` too),
from the columns NAME.item has (every text column when it has none of them); NAME.text's ``{text}`` as written.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, Skips
from .base import RawInteraction, RawItem, clean_text, decoded_lines, find_image, require_one
from .recbole import AtomicFile, text_columns

SPLIT_SUFFIXES = (".test.inter", ".valid.inter", ".train.inter")
IMAGES_FOLDER = "images"
UNISREC_FIELDS = (("title", "{%s}."), ("brand", "Brand: {%s}."), ("categories", "Categories: {%s}."))


@dataclass(frozen=True)
class Row:
    """One prediction row of a split file: where it is, the history and the target (item indices as written)."""

    line: int
    history: tuple[str, ...]
    target: str


class SplitFile:
    """One of NAME.{train,valid,test}.inter, with its three columns located."""

    def __init__(self, path: Path) -> None:
        self.atomic = AtomicFile.open(path)
        self.name = path.name
        self.user = self.atomic.require("user_id")
        self.history = self.atomic.require("item_id_list")
        self.target = self.atomic.require("item_id")

    def rows(self, skips: Skips, progress: bool) -> Iterator[tuple[str, Row]]:
        for line, cells in self.atomic.rows(skips, progress):
            user, target = cells[self.user].strip(), cells[self.target].strip()
            if not user or not target:
                skips.add(self.name, line, "user_id" if not user else "item_id", "empty value")
                continue
            yield user, Row(line, tuple(cells[self.history].split()), target)


def read_index(path: Path, skips: Skips) -> dict[str, str]:
    """INDEX -> RAW_ID from a ``RAW_ID<TAB>INDEX`` file; malformed or repeated lines are counted skips."""
    out: dict[str, str] = {}
    raws: set[str] = set()
    for line, text in decoded_lines(path, skips):
        if not text.strip():
            continue
        cells = text.split("\t")
        if len(cells) != 2 or not cells[0].strip() or not cells[1].strip():
            skips.add(path.name, line, None, "malformed row: expected RAW_ID<TAB>INDEX")
            continue
        raw, index = cells[0].strip(), cells[1].strip()
        if index in out or raw in raws:
            skips.add(path.name, line, None, f"duplicate mapping: {raw!r} -> {index!r} (the first is kept)")
            continue
        out[index] = raw
        raws.add(raw)
    return out


class UniSRecReader:
    published_split = True

    def __init__(self, folder: Path, images: Path | None = None, progress: bool = False) -> None:
        self.progress = progress
        test = require_one(folder, "*.test.inter", "UniSRec test split")
        self.name = name = test.name[: -len(".test.inter")]
        self.test = SplitFile(test)
        self.valid = SplitFile(require_one(folder, f"{name}.valid.inter", "UniSRec validation split"))
        train = folder / f"{name}.train.inter"
        self.train = SplitFile(train) if train.is_file() else None
        texts = [p for p in (folder / f"{name}.item", folder / f"{name}.text") if p.is_file()]
        if not texts:
            raise InputError(f"missing item text: expected {name}.item or {name}.text in {folder}")
        self.item = AtomicFile.open(texts[0])
        self.id_column = "item_id"
        self.item.require(self.id_column)
        self.text = text_columns(self.item, self.id_column)
        self.default_template = _default_template(self.text)
        self.index_paths = {kind: folder / f"{name}.{kind}2index" for kind in ("item", "user")}
        image_root = images or folder / IMAGES_FOLDER
        self.image_root = image_root if image_root.is_dir() else None
        self.item_ids: dict[str, str] = {}  # index as the split files write it -> id in the shards

    def _index(self, kind: str, skips: Skips) -> dict[str, str] | None:
        path = self.index_paths[kind]
        return read_index(path, skips) if path.is_file() else None

    def items(self, skips: Skips) -> Iterator[RawItem]:
        name, id_index = self.item.path.name, self.item.require(self.id_column)
        raw_ids = self._index("item", skips)
        for line, cells in self.item.rows(skips, self.progress):
            index = cells[id_index].strip()
            if not index:
                skips.add(name, line, self.id_column, "empty value")
                continue
            item = index if raw_ids is None else raw_ids.get(index)
            if item is None:
                skips.add(name, line, self.id_column, f"no raw id: {index!r} is not in {self.index_paths['item'].name}")
                continue
            self.item_ids.setdefault(index, item)  # a duplicate is passed on: the builder counts it, keeps the first
            fields = {column: clean_text(cells[i].strip()) or None for i, column in self.text}
            image = find_image(self.image_root, item) if self.image_root else None
            yield RawItem(id=item, fields=fields, image=image, file=name, line=line)

    def interactions(self, skips: Skips) -> Iterator[RawInteraction]:
        user_ids = self._index("user", skips)
        sequences = self._sequences(skips)
        if self.train is not None:
            self._check_train(sequences, skips)
        for user, (line, sequence) in sequences.items():
            if user_ids is not None and user not in user_ids:
                skips.add(self.test.name, line, "user_id", f"no raw id: {user!r} is not in {self.name}.user2index")
                continue
            raw = user if user_ids is None else user_ids[user]
            for item in sequence:
                yield RawInteraction(user=raw, item=self.item_ids[item], timestamp=None, file=self.test.name, line=line)

    def _sequences(self, skips: Skips) -> dict[str, tuple[int, tuple[str, ...]]]:
        """Per user (test file order): the test row's line and the sequence the three files agree on."""
        valid = _by_user(self.valid, skips, self.progress)
        test = _by_user(self.test, skips, self.progress)
        for user, row in valid.items():
            if user not in test:
                skips.add(self.valid.name, row.line, "user_id", f"user {user!r} has no row in {self.test.name}")
        out = {}
        for user, row in test.items():
            sequence = self._sequence(user, row, valid.get(user), skips)
            if sequence is not None:
                out[user] = (row.line, sequence)
        return out

    def _sequence(self, user: str, test: Row, valid: Row | None, skips: Skips) -> tuple[str, ...] | None:
        """History + target of the test row (one older item from a longer validation window), or None, counted."""
        where = (self.test.name, test.line)
        if valid is None:
            skips.add(*where, "user_id", f"user {user!r} has no row in {self.valid.name} (the user is left out)")
            return None
        before = test.history[:-1]
        if test.history[-1:] != (valid.target,) or not (
            valid.history == before or (len(valid.history) == len(before) + 1 and valid.history[1:] == before)
        ):
            why = f"test history is not the validation history plus its target ({self.valid.name} line {valid.line})"
            skips.add(*where, "item_id_list", why + "; the user is left out")
            return None
        sequence = valid.history[:1] * (len(valid.history) > len(before)) + test.history + (test.target,)
        unknown = next((i for i in sequence if i not in self.item_ids), None)
        if unknown is not None:
            field = "item_id" if unknown == test.target else "item_id_list"
            skips.add(*where, field, f"unknown item: {unknown!r} has no text in {self.item.path.name}"
                      " (the user is left out)")  # fmt: skip
            return None
        return sequence

    def _check_train(self, sequences: dict[str, tuple[int, tuple[str, ...]]], skips: Skips) -> None:
        """Every train row must be a run of its user's sequence that ends before the validation target."""
        assert self.train is not None
        for user, row in self.train.rows(skips, self.progress):
            found = sequences.get(user)
            if found is None:
                skips.add(self.train.name, row.line, "user_id", f"user {user!r} has no usable row in {self.test.name}")
                continue
            if not _is_run(row.history + (row.target,), found[1][:-2]):
                why = f"train row is not a run of the user's sequence before its validation target ({self.test.name}"
                skips.add(self.train.name, row.line, "item_id_list", f"{why} line {found[0]})")


def _by_user(split: SplitFile, skips: Skips, progress: bool) -> dict[str, Row]:
    out: dict[str, Row] = {}
    for user, row in split.rows(skips, progress):
        if user in out:
            skips.add(split.name, row.line, "user_id", f"duplicate user: {user!r} (its first row is kept)")
            continue
        out[user] = row
    return out


def _is_run(run: tuple[str, ...], sequence: tuple[str, ...]) -> bool:
    """Whether ``run`` is a contiguous slice of ``sequence`` (a prefix, the usual case, is tried first)."""
    n = len(run)
    if sequence[:n] == run:
        return True
    return any(sequence[start : start + n] == run for start in range(1, len(sequence) - n + 1))


def _default_template(text: list[tuple[int, str]]) -> str | None:
    """UniSRec's fields from the item file's text columns: a title column, brand, categories (or category); None
    (every text column, the title first) when it has none of them, or a title column whose name a template cannot
    hold (``movie-title``)."""
    names = [name for _, name in text]
    if names == ["text"]:
        return "{text}"
    title = next((n for n in names if "title" in n.lower()), None)
    if title is not None and not title.isidentifier():
        return None
    found = {"title": title, "brand": "brand" if "brand" in names else None}
    found["categories"] = next((n for n in ("categories", "category") if n in names), None)
    parts = [pattern % found[key] for key, pattern in UNISREC_FIELDS if found[key]]
    return "|".join(parts) if parts else None


def open_reader(folder: Path, *, images: Path | None = None, progress: bool = False) -> UniSRecReader:
    return UniSRecReader(folder, images, progress)
