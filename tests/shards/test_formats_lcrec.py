"""The LC-Rec JSON reader on hand-written files: sequences kept in order with the last two as the published
targets, LC-Rec's default text, integer and string ids, gzip, bad members as counted skips, unusable files (syntax
errors, deep nesting) as clear errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from test_build import all_samples

from shards.build import BuildOptions, build
from shards.errors import InputError
from shards.inspect import summary
from shards.safejson import MAX_JSON_DEPTH

ITEMS = {
    "1": {"title": "Cordless Phone", "brand": "AT&amp;T", "categories": "Office, Phones", "description": "A phone."},
    "2": {"title": "Stapler", "brand": "", "categories": "Office, Supplies", "description": "<p>Staples <b>20</b></p>"},
    "3": {"title": "Pens", "brand": "Bic", "categories": "", "description": "", "price": 3.5},
    "4": {"title": "Paper", "brand": "Acme", "categories": "Office, Paper", "description": "White."},
    "5": {"title": "Desk", "description": "Oak &lt;solid&gt;"},  # no brand, no categories
    "6": {"title": "Lamp", "brand": "Lux", "categories": "Lighting", "description": "Bright."},
}
TEXTS = {
    "1": "Cordless Phone. Brand: AT&T. Categories: Office, Phones. A phone.",
    "2": "Stapler. Categories: Office, Supplies. Staples 20",
    "3": "Pens. Brand: Bic.",
    "4": "Paper. Brand: Acme. Categories: Office, Paper. White.",
    "5": "Desk. Oak <solid>",
    "6": "Lamp. Brand: Lux. Categories: Lighting. Bright.",
}
INTER = {"u1": [1, 2, 3, 4, 5], "u2": ["2", "3", "6"], "u3": [3, " 1 ", 2, 4]}  # numbers, strings, mixed
SEQS = {"u1": ["1", "2", "3", "4", "5"], "u2": ["2", "3", "6"], "u3": ["3", "1", "2", "4"]}


def members(obj: dict) -> list[str]:
    """The members of ``obj`` as JSON text, one a line."""
    return [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in obj.items()]


def json_text(lines: list[str]) -> str:
    """A JSON object with one member a line: the member at index i is on line i + 2 of the file."""
    return "{\n" + ",\n".join(f"  {m}" for m in lines) + "\n}\n"


def write_lcrec(
    folder: Path, inter: list[str] | str | bytes, item: list[str] | str | bytes, gz: bool = False, name: str = "Toy"
) -> Path:
    """NAME.inter.json and NAME.item.json from member lines (or whole texts or bytes); ``gz``: gzip'd, as
    NAME.*.json.gz."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, content in ((".inter.json", inter), (".item.json", item)):
        data = json_text(content) if isinstance(content, list) else content
        raw = data.encode() if isinstance(data, str) else data
        path = folder / (name + suffix + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    return folder


def toy(folder: Path, **kw) -> Path:
    return write_lcrec(folder, members(INTER), members(ITEMS), **kw)


def opts(**kw) -> BuildOptions:
    return BuildOptions(**{"format": "lcrec", "image_size": 32, **kw})


def sequences(out: Path) -> dict[str, list[str]]:
    return {s.id: [s.items[p].id for p in s.seq] for s in all_samples(out, "seqs")}


def texts(out: Path) -> dict[str, str | None]:
    return {it.id: it.text for it in all_samples(out, "items")}


def skips_of(manifest: dict) -> dict[tuple, str]:
    got = {(s["file"], s["line"], s["field"]): s["reason"] for s in manifest["skipped"]}
    assert len(got) == len(manifest["skipped"]), manifest["skipped"]
    return got


def test_sequences_targets_and_default_text(tmp_path: Path) -> None:
    folder = toy(tmp_path / "toy")
    manifest = build(folder, tmp_path / "out", BuildOptions(image_size=32), progress=False)  # --format auto
    assert manifest["format"] == "lcrec" and manifest["skipped"] == [] and manifest["timestamps"] is False
    assert manifest["split"] == {"kind": "published", "users": 3, "users_with_published_targets": 3}
    seqs = sequences(tmp_path / "out")
    assert seqs == SEQS  # file order kept; 7, "7" and " 7 " are one item; u2 (3 items) and item 6 (once) stay
    raw = json.loads((folder / "Toy.inter.json").read_text())
    for user, seq in seqs.items():  # the file's last two items are the validation and test targets
        assert seq[-2:] == [str(i).strip() for i in raw[user][-2:]], user
    assert texts(tmp_path / "out") == TEXTS  # HTML tags dropped, entities unescaped, empty fields leave no label
    assert "split: published by the source files (intact)" in summary(tmp_path / "out")


def test_text_template_sees_every_field(tmp_path: Path) -> None:
    toy(tmp_path / "toy")
    build(tmp_path / "toy", tmp_path / "out", opts(text_template="{title}|costs {price}"), progress=False)
    got = texts(tmp_path / "out")
    assert got["3"] == "Pens costs 3.5" and got["1"] == "Cordless Phone"


@pytest.mark.parametrize("names", ["gz", "plain"])
def test_gzip_files(tmp_path: Path, names: str) -> None:
    """Gzip'd files as NAME.*.json.gz, or gzip'd content under the plain names (told by its magic bytes)."""
    folder = toy(tmp_path / "toy", gz=True)
    if names == "plain":
        for path in folder.glob("*.gz"):
            path.rename(path.with_suffix(""))
    manifest = build(folder, tmp_path / "out", BuildOptions(image_size=32), progress=False)
    assert manifest["format"] == "lcrec" and manifest["skipped"] == []
    assert sequences(tmp_path / "out") == SEQS and texts(tmp_path / "out") == TEXTS


def test_bad_members_are_counted_skips(tmp_path: Path) -> None:
    item = members(ITEMS) + [
        '"7": "just a title"',  # 8: not an object
        '"": {"title": "No id"}',  # 9: empty id
        '"8": {"title": {"nested": "object"}, "brand": "B"}',  # 10: a field of the wrong type: dropped
        '"1": {"title": "Again"}',  # 11: duplicate item (the first is kept)
        '"9": ["a", "list"]',  # 12: not an object
    ]
    inter = members(INTER) + [
        '"u4": {"1": 2}',  # 5: not a list
        '"u5": [1, true, 2]',  # 6: a bool is no id
        '"u6": [1, 2.5, 3]',  # 7: nor a float
        '"u7": [1, null, 3]',  # 8
        '"u8": [1, "", 3]',  # 9: nor an empty string
        '"u9": [1, 99, 3]',  # 10: unknown item (the whole user goes)
        '"u10": [1, 2, 7]',  # 11: item 7 was skipped: unknown too
        '"": [1, 2, 3]',  # 12: empty user
        '"u1": [4, 5, 6]',  # 13: duplicate user (the first is kept)
        '"u11": [8, 1, 2]',  # 14: fine: item 8 lost only a field
        '"u12": "1 2 3"',  # 15: a string is not a list
    ]
    write_lcrec(tmp_path / "toy", inter, item)
    manifest = build(tmp_path / "toy", tmp_path / "out", opts(), progress=False)
    expect = {
        ("Toy.item.json", 8, "7"): "malformed item: expected an object, got str",
        ("Toy.item.json", 9, None): "empty item id",
        ("Toy.item.json", 10, "title"): "wrong type: expected text, a number or a list, got dict",
        ("Toy.item.json", 11, "id"): "duplicate item id: '1' (the first definition is kept)",
        ("Toy.item.json", 12, "9"): "malformed item: expected an object, got list",
        ("Toy.inter.json", 5, "u4"): "malformed sequence: expected a list of item ids, got dict",
        ("Toy.inter.json", 6, "u5"): "malformed sequence: True is not an item id (the user is left out)",
        ("Toy.inter.json", 7, "u6"): "malformed sequence: 2.5 is not an item id",
        ("Toy.inter.json", 8, "u7"): "malformed sequence: None is not an item id",
        ("Toy.inter.json", 9, "u8"): "malformed sequence: '' is not an item id",
        ("Toy.inter.json", 10, "u9"): "unknown item: '99' is not in Toy.item.json (the user is left out)",
        ("Toy.inter.json", 11, "u10"): "unknown item: '7' is not in Toy.item.json",
        ("Toy.inter.json", 12, None): "empty user id",
        ("Toy.inter.json", 13, "u1"): "duplicate user: its first sequence is kept",
        ("Toy.inter.json", 15, "u12"): "malformed sequence: expected a list of item ids, got str",
    }
    got = skips_of(manifest)
    assert set(got) == set(expect), sorted(got.items(), key=str)
    for where, reason in expect.items():
        assert got[where].startswith(reason), (where, got[where])
    assert sequences(tmp_path / "out") == {**SEQS, "u11": ["8", "1", "2"]}
    assert texts(tmp_path / "out")["8"] == "Brand: B."
    assert manifest["split"] == {"kind": "published", "users": 4, "users_with_published_targets": 4}


def test_explicit_filters_break_the_published_split_and_say_so(tmp_path: Path) -> None:
    toy(tmp_path / "toy")
    manifest = build(tmp_path / "toy", tmp_path / "out", opts(min_user_interactions=4), progress=False)
    assert manifest["split"] == {"kind": "published", "users": 3, "users_with_published_targets": 2}
    assert sorted(sequences(tmp_path / "out")) == ["u1", "u3"]
    assert "NOT intact: 2 of 3 users keep the published targets" in summary(tmp_path / "out")


@pytest.mark.parametrize(
    ("inter", "message"),
    [
        (
            '{\n  "u1": [1, 2, 3],\n  "u2": [1, 2 3]\n}',
            r"Toy.inter.json:3: malformed JSON: Expecting ',' delimiter at column 15",
        ),
        (
            '{\n  "u1": [1, 2, 3],\n}',
            r"Toy.inter.json:3: malformed JSON: expected a member name in double quotes at column 1",
        ),
        ('{"u1": [1, 2, 3]', r"Toy.inter.json:1: malformed JSON: expected ',' or '}' at column 17"),
        ('{"u1" [1, 2, 3]}', r"Toy.inter.json:1: malformed JSON: expected ':' at column 7"),
        ('{"u1": [1, 2, 3]}\n{"u2": [1]}', r"Toy.inter.json:2: malformed JSON: extra data after the object at col"),
        ('\n\n[["u1", [1, 2, 3]]]', r"Toy.inter.json:3: malformed JSON: expected the file to be one JSON object"),
        ("", r"Toy.inter.json:1: malformed JSON: expected the file to be one JSON object"),
        (b'{"u1": [1, 2, 3],\n "\xff": [1]}', r"Toy.inter.json:2: not UTF-8: byte 20"),
        ('{\n "u1": ' + "[" * 100_000, r"Toy.inter.json:2: malformed JSON: nested too deeply at column 8"),
        ("[" * 100_000, r"Toy.inter.json:1: malformed JSON: expected the file to be one JSON object"),
        (
            '{\n "u1": [1, 2, 3],\n "u2": ' + "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1) + "}",
            rf"Toy.inter.json:3: malformed JSON: nested too deeply \(more than {MAX_JSON_DEPTH} levels\) at column 8",
        ),
        (gzip.compress(b'{"u1": [1, 2, 3]}')[:-6], "Toy.inter.json: corrupt or truncated gzip data"),
        (
            '{"u1": [1, ' + "9" * 5000 + "]}",  # beyond Python's int conversion limit: a ValueError, not a skip
            r"Toy.inter.json:1: malformed JSON: unreadable value \(Exceeds the limit \(4300 digits\).* at column 8",
        ),
    ],
)
def test_unusable_files_are_errors_naming_line_and_column(tmp_path: Path, inter: str | bytes, message: str) -> None:
    """The file is one JSON document: a syntax error anywhere makes it unusable (not a skip)."""
    write_lcrec(tmp_path / "toy", inter, members(ITEMS))
    with pytest.raises(InputError, match=message):
        build(tmp_path / "toy", tmp_path / "out", opts(), progress=False)
    assert not (tmp_path / "out").exists()


def test_deep_item_values_are_an_error_not_a_recursion_error(tmp_path: Path) -> None:
    """A value the JSON decoder still reads but the text cleaning and rendering (recursive) could not: the reader
    stops it at MAX_JSON_DEPTH levels; exactly that many still build."""
    deep = "[" * (MAX_JSON_DEPTH - 1) + '"x"' + "]" * (MAX_JSON_DEPTH - 1)  # within the item's object
    write_lcrec(tmp_path / "toy", members(INTER), [*members(ITEMS), f'"7": {{"title": {deep}}}'])
    build(tmp_path / "toy", tmp_path / "out", opts(), progress=False)
    assert texts(tmp_path / "out")["1"] == TEXTS["1"]
    for depth in (MAX_JSON_DEPTH, 500, 950):  # 500: deep enough to exhaust the stack in clean_text before the fix
        deep = "[" * depth + '"x"' + "]" * depth
        write_lcrec(tmp_path / "toy", members(INTER), [*members(ITEMS), f'"7": {{"title": {deep}}}'])
        with pytest.raises(InputError, match=r"Toy.item.json:8: malformed JSON: nested too deeply"):
            build(tmp_path / "toy", tmp_path / "out2", opts(), progress=False)


def test_byte_order_mark_and_empty_object(tmp_path: Path) -> None:
    write_lcrec(tmp_path / "toy", b"\xef\xbb\xbf" + json_text(members(INTER)).encode(), members(ITEMS))
    build(tmp_path / "toy", tmp_path / "out", opts(), progress=False)
    assert sequences(tmp_path / "out") == SEQS
    write_lcrec(tmp_path / "toy", " { } ", members(ITEMS))
    with pytest.raises(InputError, match="no user of .* has 3 interactions"):
        build(tmp_path / "toy", tmp_path / "out2", opts(), progress=False)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: (d / "Toy.item.json").unlink(), r"expected one LC-Rec items file 'Toy.item.json' or .* found none"),
        (lambda d: (d / "Toy.inter.json").unlink(), r"expected one LC-Rec interactions file '\*.inter.json'"),
        (lambda d: (d / "More.inter.json").write_text("{}"), "found More.inter.json, Toy.inter.json"),
    ],
)
def test_missing_or_extra_files_are_errors(tmp_path: Path, setup, message: str) -> None:
    folder = toy(tmp_path / "toy")
    setup(folder)
    with pytest.raises(InputError, match=message):
        build(folder, tmp_path / "out", opts(), progress=False)
