"""The UniSRec / RecBole benchmark reader on hand-written folders: NAME.item vs NAME.text, item2index and
user2index, with and without NAME.train.inter; the published split kept for every user; every inconsistency a
counted skip naming file, line and field; unusable folders a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_build import all_samples

from shards.build import BuildOptions, build
from shards.errors import InputError
from shards.inspect import summary


def tsv(*cells: str) -> str:
    return "\t".join(cells)


SPLIT_HEADER = tsv("user_id:token", "item_id_list:token_seq", "item_id:token")
SEQS = {  # user index -> its whole sequence (item indices, oldest first)
    "1": ["1", "2", "3", "4", "5"],
    "2": ["2", "3", "6"],  # 3 interactions, and item 6 is seen only here: kept (no k-core by default)
    "3": ["3", "1", "2", "4"],
}
ITEM = [  # UniSRec's columns; price is numeric (not text); item 2 has no brand, item 6 no categories
    tsv("item_id:token", "title:token_seq", "brand:token", "categories:token_seq", "price:float"),
    tsv("1", "Alpha Quest", "Acme", "Games Action", "9.5"),
    tsv("2", "Beta &amp; Co <b>Deluxe</b>", "", "Games", "1"),
    tsv("3", "Gamma", "Bolt", "Accessories", "2"),
    tsv("4", "Delta", "Acme", "Games", "3"),
    tsv("5", "Epsilon", "Acme", "Games", "4"),
    tsv("6", "Zeta", "Bolt", "", "5"),
]
TEXTS = {
    "1": "Alpha Quest. Brand: Acme. Categories: Games Action.",
    "2": "Beta & Co Deluxe. Categories: Games.",
    "3": "Gamma. Brand: Bolt. Categories: Accessories.",
    "4": "Delta. Brand: Acme. Categories: Games.",
    "5": "Epsilon. Brand: Acme. Categories: Games.",
    "6": "Zeta. Brand: Bolt.",
}


def split_lines(seqs: dict[str, list[str]]) -> dict[str, list[str]]:
    """The three split files by the publisher's rule: test = all but the last item -> the last; valid = one step
    earlier; train = every shorter prefix of the sequence before its validation target."""
    out: dict[str, list[str]] = {"train": [SPLIT_HEADER], "valid": [SPLIT_HEADER], "test": [SPLIT_HEADER]}
    for user, s in seqs.items():
        out["test"].append(tsv(user, " ".join(s[:-1]), s[-1]))
        out["valid"].append(tsv(user, " ".join(s[:-2]), s[-2]))
        out["train"] += [tsv(user, " ".join(s[:n]), s[n]) for n in range(1, len(s) - 2)]
    return out


def write_unisrec(folder: Path, files: dict[str, list[str] | None], name: str = "Toy") -> Path:
    """``NAME.<suffix>`` from lines, for each suffix of ``files`` (None: the file is absent)."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, lines in files.items():
        path = folder / f"{name}.{suffix}"
        if lines is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def toy(folder: Path, seqs: dict[str, list[str]] = SEQS, **files: list[str] | None) -> Path:
    """The toy domain: ``seqs`` split by the publisher's rule, ITEM; keyword files (suffix with '_' for '.',
    e.g. ``train_inter=None``) replace or remove files."""
    base = {f"{kind}.inter": lines for kind, lines in split_lines(seqs).items()}
    base["item"] = ITEM
    return write_unisrec(folder, {**base, **{k.replace("_", "."): v for k, v in files.items()}})


def opts(**kw) -> BuildOptions:
    return BuildOptions(**{"format": "unisrec", "image_size": 32, **kw})


def sequences(out: Path) -> dict[str, list[str]]:
    return {s.id: [s.items[p].id for p in s.seq] for s in all_samples(out, "seqs")}


def file_targets(folder: Path, name: str = "Toy") -> dict[str, tuple[str, str]]:
    """user -> (validation target, test target), read from the split files themselves (mapped to raw ids where
    NAME.item2index / NAME.user2index exist)."""
    maps = {}
    for kind in ("item", "user"):
        path = folder / f"{name}.{kind}2index"
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        maps[kind] = {c[1]: c[0] for c in (line.split("\t") for line in lines) if len(c) == 2}
    targets: dict[str, dict[str, str]] = {}
    for kind in ("valid", "test"):
        for line in (folder / f"{name}.{kind}.inter").read_text(encoding="utf-8").splitlines()[1:]:
            cells = line.split("\t")
            if len(cells) == 3:  # the first row of a user counts, as in the reader
                user, target = maps["user"].get(cells[0], cells[0]), maps["item"].get(cells[2], cells[2])
                targets.setdefault(user, {}).setdefault(kind, target)
    return {user: (t.get("valid", ""), t.get("test", "")) for user, t in targets.items()}


def assert_published_targets(out: Path, folder: Path) -> None:
    """Every user of the shards has the files' validation and test targets as its last two items."""
    expected = file_targets(folder)
    for user, seq in sequences(out).items():
        assert (seq[-2], seq[-1]) == expected[user], user


def skips_of(manifest: dict) -> dict[tuple, str]:
    return {(s["file"], s["line"], s["field"]): s["reason"] for s in manifest["skipped"]}


def assert_skips(manifest: dict, expect: dict[tuple, str]) -> None:
    """Exactly the skips ``expect`` names (file, line, field), each reason starting as given."""
    got = skips_of(manifest)
    assert len(got) == len(manifest["skipped"]), manifest["skipped"]  # no place reported twice
    assert set(got) == set(expect), sorted(got.items(), key=str)
    for where, reason in expect.items():
        assert got[where].startswith(reason), (where, got[where])


def test_item_file_default_template_and_published_split(tmp_path: Path) -> None:
    folder = toy(tmp_path / "toy")
    manifest = build(folder, tmp_path / "out", opts(), progress=False)
    assert manifest["format"] == "unisrec" and manifest["skipped"] == [] and manifest["timestamps"] is False
    assert manifest["split"] == {"kind": "published", "users": 3, "users_with_published_targets": 3}
    options = manifest["options"]
    assert (options["min_user_interactions"], options["min_item_interactions"], options["max_seq_len"]) == (3, 1, None)
    assert sequences(tmp_path / "out") == SEQS  # no k-core: user 2 (3 items) and item 6 (seen once) survive
    assert_published_targets(tmp_path / "out", folder)
    items = {it.id: it.text for it in all_samples(tmp_path / "out", "items")}
    assert items == TEXTS  # HTML cleaned; a missing brand or category leaves no dangling label
    counts = manifest["counts"]
    assert (counts["users"], counts["items"], counts["interactions"]) == (3, 6, 12)
    assert "split: published by the source files (intact)" in summary(tmp_path / "out")


def test_auto_format_and_no_train_file(tmp_path: Path) -> None:
    """NAME.train.inter is optional: the sequences come from the test and validation files alone."""
    folder = toy(tmp_path / "toy", train_inter=None)
    manifest = build(folder, tmp_path / "out", BuildOptions(image_size=32), progress=False)  # --format auto
    assert manifest["format"] == "unisrec" and manifest["skipped"] == []
    assert sequences(tmp_path / "out") == SEQS
    assert_published_targets(tmp_path / "out", folder)


def test_item_file_without_unisrec_columns_uses_every_text_column(tmp_path: Path) -> None:
    item = [tsv("item_id:token", "name:token_seq", "maker:token", "year:float", "maker_id:token")]
    item += [tsv(str(i), f"Thing {i}", "Acme" if i % 2 else "", "2001", f"m{i}") for i in range(1, 7)]
    toy(tmp_path / "toy", item=item)
    manifest = build(tmp_path / "toy", tmp_path / "out", opts(), progress=False)
    assert manifest["skipped"] == []
    items = {it.id: it.text for it in all_samples(tmp_path / "out", "items")}
    assert items == {str(i): f"Thing {i}. Acme." if i % 2 else f"Thing {i}." for i in range(1, 7)}


def test_title_column_a_template_cannot_name_falls_back_to_every_column(tmp_path: Path) -> None:
    """``movie-title`` is no template field name: the default text is every text column, the title first (it was
    an error about a template the user never gave)."""
    item = [tsv("item_id:token", "year:token", "movie-title:token_seq", "brand:token")]
    item += [tsv(str(i), "1999", f"Film {i}", "Acme") for i in range(1, 7)]
    toy(tmp_path / "toy", item=item)
    manifest = build(tmp_path / "toy", tmp_path / "out", opts(), progress=False)
    assert manifest["skipped"] == []
    assert {it.id: it.text for it in all_samples(tmp_path / "out", "items")} == {
        str(i): f"Film {i}. 1999. Acme." for i in range(1, 7)
    }


def test_text_file_is_used_as_written_and_item_file_wins(tmp_path: Path) -> None:
    text = [tsv("item_id:token", "text:token_seq")]
    text += [tsv(str(i), f"game number {i}, by Acme") for i in range(1, 7)]
    toy(tmp_path / "toy", item=None, text=text)
    manifest = build(tmp_path / "toy", tmp_path / "out", opts(), progress=False)
    assert manifest["skipped"] == []
    items = {it.id: it.text for it in all_samples(tmp_path / "out", "items")}
    assert items == {str(i): f"game number {i}, by Acme" for i in range(1, 7)}  # no period added, nothing reordered
    assert sequences(tmp_path / "out") == SEQS
    toy(tmp_path / "toy", text=text)  # both files: NAME.item is read
    build(tmp_path / "toy", tmp_path / "out2", opts(), progress=False)
    assert {it.id: it.text for it in all_samples(tmp_path / "out2", "items")} == TEXTS


def test_text_template_overrides_the_default(tmp_path: Path) -> None:
    toy(tmp_path / "toy")
    build(tmp_path / "toy", tmp_path / "out", opts(text_template="{brand}:|{title}"), progress=False)
    items = {it.id: it.text for it in all_samples(tmp_path / "out", "items")}
    assert items["1"] == "Acme: Alpha Quest" and items["2"] == "Beta & Co Deluxe"


ITEM2INDEX = [tsv(f"B00{i}", str(i)) for i in range(1, 6)]  # item 6 has no raw id
USER2INDEX = [tsv("AUSER1", "1"), tsv("AUSER3", "3")]  # user 2 has none


def test_index_files_give_raw_ids(tmp_path: Path) -> None:
    """With NAME.item2index the shards' item ids are the raw ids (ASINs); with NAME.user2index, the user ids. An
    item without a raw id is a counted skip, and so is every user naming it (its targets would move otherwise)."""
    folder = toy(tmp_path / "toy", item2index=ITEM2INDEX, user2index=[*USER2INDEX, tsv("AUSER2", "2")])
    manifest = build(folder, tmp_path / "out", opts(), progress=False)
    assert_skips(
        manifest,
        {
            ("Toy.item", 7, "item_id"): "no raw id: '6' is not in Toy.item2index",
            ("Toy.test.inter", 3, "item_id"): "unknown item: '6' has no text in Toy.item (the user is left out)",
        },
    )
    raw = {f"AUSER{u}": [f"B00{i}" for i in s] for u, s in SEQS.items() if u != "2"}
    assert sequences(tmp_path / "out") == raw
    assert_published_targets(tmp_path / "out", folder)
    assert {it.id for it in all_samples(tmp_path / "out", "items")} == {f"B00{i}" for i in range(1, 6)}
    assert manifest["split"] == {"kind": "published", "users": 2, "users_with_published_targets": 2}


def test_item2index_alone_and_a_user_without_raw_id(tmp_path: Path) -> None:
    seqs = {u: [i for i in s if i != "6"] + (["1"] if u == "2" else []) for u, s in SEQS.items()}  # no item 6
    folder = toy(tmp_path / "toy", seqs, item2index=ITEM2INDEX)
    manifest = build(folder, tmp_path / "out", opts(), progress=False)
    assert_skips(manifest, {("Toy.item", 7, "item_id"): "no raw id: '6'"})  # unused item: only its own row
    assert sequences(tmp_path / "out") == {u: [f"B00{i}" for i in s] for u, s in seqs.items()}  # user ids as written
    assert_published_targets(tmp_path / "out", folder)
    (tmp_path / "toy" / "Toy.user2index").write_text("\n".join(USER2INDEX) + "\n")
    manifest = build(folder, tmp_path / "out", opts(), overwrite=True, progress=False)
    assert skips_of(manifest)[("Toy.test.inter", 3, "user_id")] == "no raw id: '2' is not in Toy.user2index"
    assert sorted(sequences(tmp_path / "out")) == ["AUSER1", "AUSER3"]


def test_malformed_index_rows_are_counted_skips(tmp_path: Path) -> None:
    item2index = [*ITEM2INDEX, "B006", "", tsv("B006", ""), tsv("B006", "6", "x"), tsv("B001", "6"), tsv("B009", "1")]
    item2index.append(tsv("B006", "6"))  # line 12: the first well-formed mapping of 6
    folder = toy(tmp_path / "toy", item2index=item2index)
    manifest = build(folder, tmp_path / "out", opts(), progress=False)
    bad = "malformed row: expected RAW_ID<TAB>INDEX"
    assert_skips(
        manifest,
        {
            ("Toy.item2index", 6, None): bad,
            ("Toy.item2index", 8, None): bad,  # line 7 is blank: ignored
            ("Toy.item2index", 9, None): bad,
            ("Toy.item2index", 10, None): "duplicate mapping: 'B001' -> '6' (the first is kept)",
            ("Toy.item2index", 11, None): "duplicate mapping: 'B009' -> '1' (the first is kept)",
        },
    )
    assert sequences(tmp_path / "out") == {u: [f"B00{i}" for i in s] for u, s in SEQS.items()}


def test_explicit_filters_break_the_published_split_and_say_so(tmp_path: Path) -> None:
    folder = toy(tmp_path / "toy")
    manifest = build(folder, tmp_path / "out", opts(min_user_interactions=4), progress=False)
    assert manifest["split"] == {"kind": "published", "users": 3, "users_with_published_targets": 2}
    assert sorted(sequences(tmp_path / "out")) == ["1", "3"]
    assert "split: published by the source files (NOT intact: 2 of 3 users" in summary(tmp_path / "out")
    # items seen once (5: user 1's test target; 6) go: user 1's targets move, user 2 drops below 3 items
    manifest = build(folder, tmp_path / "out2", opts(min_item_interactions=2), progress=False)
    assert manifest["split"] == {"kind": "published", "users": 3, "users_with_published_targets": 1}
    assert sequences(tmp_path / "out2") == {"1": ["1", "2", "3", "4"], "3": SEQS["3"]}
    # a cap on the length keeps the targets
    manifest = build(folder, tmp_path / "out3", opts(max_seq_len=3), progress=False)
    assert manifest["split"] == {"kind": "published", "users": 3, "users_with_published_targets": 3}
    assert sequences(tmp_path / "out3")["1"] == ["3", "4", "5"]


def test_windowed_histories_rebuild_the_longer_sequence(tmp_path: Path) -> None:
    """Histories capped at 3 items: the validation window reaches one item further back than the test window."""
    seqs = {"1": ["1", "2", "3", "4", "5", "6"], "2": SEQS["2"]}
    capped = split_lines({})
    for user, s in seqs.items():
        capped["test"].append(tsv(user, " ".join(s[:-1][-3:]), s[-1]))
        capped["valid"].append(tsv(user, " ".join(s[:-2][-3:]), s[-2]))
    folder = toy(tmp_path / "toy", seqs, test_inter=capped["test"], valid_inter=capped["valid"], train_inter=None)
    manifest = build(folder, tmp_path / "out", opts(), progress=False)
    assert manifest["skipped"] == []
    assert sequences(tmp_path / "out") == {"1": ["2", "3", "4", "5", "6"], "2": SEQS["2"]}
    assert_published_targets(tmp_path / "out", folder)


def test_inconsistent_files_are_counted_skips(tmp_path: Path) -> None:
    lines = split_lines(SEQS)
    test, valid, train = lines["test"], lines["valid"], lines["train"]
    test += [
        tsv("4", "1 2", "3"),  # 5: no validation row
        tsv("6", "1 2 4", "5"),  # 6: history is not valid's history (1 2) plus its target (3)
        tsv("7", "1 2", "99"),  # 7: unknown test target
        tsv("8", "1 98", "2"),  # 8: unknown item in the history
        tsv("1", "1 2", "3"),  # 9: duplicate user (the first row is kept)
        tsv("", "1 2", "3"),  # 10: no user
        tsv("9", "1 2"),  # 11: a cell short
        tsv("10", "", "3"),  # 12: empty history: cannot be valid's history plus its target
    ]
    valid += [
        tsv("5", "1", "2"),  # 5: no test row
        tsv("6", "1 2", "3"),
        tsv("7", "1", "2"),
        tsv("8", "1", "98"),
        tsv("2", "2", "3"),  # 9: duplicate user
        tsv("9", "1", ""),  # 10: no target
        tsv("10", "1", "2"),
    ]
    train += [
        tsv("1", "2 1", "3"),  # 5: not a run of user 1's 1 2 3 (4 5 are its targets)
        tsv("1", "3 4", "5"),  # 6: a run, but of the targets
        tsv("1", "1", "3"),  # 7: not consecutive
        tsv("1", "2", "3"),  # 8: fine (a run that is not a prefix)
        tsv("11", "1", "2"),  # 9: user without a test row
        tsv("6", "1", "2"),  # 10: user left out above: no usable test row
    ]
    folder = toy(tmp_path / "toy", test_inter=test, valid_inter=valid, train_inter=train)
    manifest = build(folder, tmp_path / "out", opts(), progress=False)
    not_plus = "test history is not the validation history plus its target (Toy.valid.inter line"
    not_run = "train row is not a run of the user's sequence before its validation target (Toy.test.inter line"
    assert_skips(
        manifest,
        {
            ("Toy.test.inter", 5, "user_id"): "user '4' has no row in Toy.valid.inter (the user is left out)",
            ("Toy.valid.inter", 5, "user_id"): "user '5' has no row in Toy.test.inter",
            ("Toy.test.inter", 6, "item_id_list"): f"{not_plus} 6); the user is left out",
            ("Toy.test.inter", 7, "item_id"): "unknown item: '99' has no text in Toy.item (the user is left out)",
            ("Toy.test.inter", 8, "item_id_list"): "unknown item: '98' has no text in Toy.item",
            ("Toy.test.inter", 9, "user_id"): "duplicate user: '1' (its first row is kept)",
            ("Toy.test.inter", 10, "user_id"): "empty value",
            ("Toy.test.inter", 11, None): "malformed row: 2 fields, header has 3",
            ("Toy.test.inter", 12, "item_id_list"): f"{not_plus} 11); the user is left out",
            ("Toy.valid.inter", 9, "user_id"): "duplicate user: '2' (its first row is kept)",
            ("Toy.valid.inter", 10, "item_id"): "empty value",
            ("Toy.train.inter", 5, "item_id_list"): f"{not_run} 2)",
            ("Toy.train.inter", 6, "item_id_list"): f"{not_run} 2)",
            ("Toy.train.inter", 7, "item_id_list"): f"{not_run} 2)",
            ("Toy.train.inter", 9, "user_id"): "user '11' has no usable row in Toy.test.inter",
            ("Toy.train.inter", 10, "user_id"): "user '6' has no usable row in Toy.test.inter",
        },
    )
    assert sequences(tmp_path / "out") == SEQS  # only the consistent users, as the files give them
    assert_published_targets(tmp_path / "out", folder)
    assert manifest["split"] == {"kind": "published", "users": 3, "users_with_published_targets": 3}


def test_user_left_out_when_any_of_its_items_lacks_text(tmp_path: Path) -> None:
    """Dropping the one unknown interaction would move the published targets: the whole user goes."""
    folder = toy(tmp_path / "toy", item=ITEM[:-1])  # no row for item 6, user 2's test target
    manifest = build(folder, tmp_path / "out", opts(), progress=False)
    assert_skips(manifest, {("Toy.test.inter", 3, "item_id"): "unknown item: '6' has no text in Toy.item"})
    assert sequences(tmp_path / "out") == {u: s for u, s in SEQS.items() if u != "2"}


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: (d / "Toy.item").unlink(), "missing item text: expected Toy.item or Toy.text in "),
        (
            lambda d: (d / "Toy.test.inter").write_text(tsv("user_id:token", "item_id:token") + "\n"),
            r"Toy.test.inter:1: field 'item_id_list': header \['user_id', 'item_id'\] lacks column 'item_id_list'",
        ),
        (
            lambda d: (d / "Toy.valid.inter").write_text(tsv("uid:token", "item_id_list:token_seq", "item_id:token")),
            "Toy.valid.inter:1: field 'user_id'",
        ),
        (lambda d: (d / "Toy.item").write_text(tsv("iid:token", "title:token_seq")), "Toy.item:1: field 'item_id'"),
        (lambda d: (d / "Toy.item").write_text("item_id\ttitle\n"), "Toy.item:1: header cell 'item_id' is not"),
        (
            lambda d: (d / "More.test.inter").write_text(SPLIT_HEADER),
            r"expected one UniSRec test split file '\*.test.inter' in .*, found More.test.inter, Toy.test.inter",
        ),
        (lambda d: (d / "Toy.valid.inter").unlink(), "expected one UniSRec validation split file 'Toy.valid.inter'"),
    ],
)
def test_unusable_input_is_a_clear_error(tmp_path: Path, setup, message: str) -> None:
    folder = toy(tmp_path / "toy")
    setup(folder)
    with pytest.raises(InputError, match=message):
        build(folder, tmp_path / "out", opts(), progress=False)
    assert not (tmp_path / "out").exists()
