"""The RecBole reader on hand-written atomic files: typed headers, token_seq text, ties, posters, bad input."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from test_build import all_samples, jpeg

from shards.build import BuildOptions, build
from shards.errors import InputError


def write_recbole(
    folder: Path, inter: list[str | bytes], item: list[str | bytes], images: dict[str, bytes] | None = None
) -> Path:
    """``toy.inter`` and ``toy.item`` from tab-separated lines (str or raw bytes); ``images`` by relative path."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in (("toy.inter", inter), ("toy.item", item)):
        (folder / name).write_bytes(b"\n".join(x.encode() if isinstance(x, str) else x for x in lines) + b"\n")
    for rel, data in (images or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def tsv(*cells: str) -> str:
    return "\t".join(cells)


INTER = [
    tsv("user_id:token", "item_id:token", "rating:float", "timestamp:float"),
    tsv("u1", "c", "4", "30"),
    tsv("u1", "a", "5", "10"),
    tsv("u1", "b", "3", "20"),
    tsv("u1", "d", "1", "20"),  # same time as b, later in the file
    tsv("u2", "d", "2", "5"),
    tsv("u2", "a", "2", "5"),
    tsv("u2", "b", "2", "5"),
]
ITEM = [  # the title is not the first text column; price is numeric and brand_id an id: neither is text
    tsv("item_id:token", "year:token", "movie_title:token_seq", "class:token_seq", "price:float", "brand_id:token"),
    tsv("a", "1999", "Alpha  Movie", "Action Comedy", "9.5", "x1"),
    tsv("b", "2000", "Beta", "Drama", "1.0", "x2"),
    tsv("c", "", "Gamma", "", "2.0", "x3"),
    tsv("d", "2001", '"Delta" begins with a quote', "Horror", "3.0", "x4"),
]


def opts(**kw) -> BuildOptions:
    return BuildOptions(**{"format": "recbole", "min_user_interactions": 3, "image_size": 32, **kw})


def sequences(out: Path) -> dict[str, list[str]]:
    return {s.id: [s.items[p].id for p in s.seq] for s in all_samples(out, "seqs")}


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (0, 0, 200)).save(buf, "PNG")
    return buf.getvalue()


def test_typed_headers_token_seq_ties_and_posters(tmp_path: Path) -> None:
    folder = write_recbole(tmp_path / "toy", INTER, ITEM, {"posters/a.jpg": jpeg((200, 0, 0)), "posters/b.png": png()})
    manifest = build(folder, tmp_path / "out", opts(), progress=False)
    assert manifest["skipped"] == [] and manifest["timestamps"] is True
    items = {it.id: it for it in all_samples(tmp_path / "out", "items")}
    assert {k: it.text for k, it in items.items()} == {
        "a": "Alpha Movie. 1999. Action Comedy.",
        "b": "Beta. 2000. Drama.",
        "c": "Gamma.",
        "d": '"Delta" begins with a quote. 2001. Horror.',
    }
    assert [k for k, it in items.items() if it.image is not None] == ["a", "b"]  # .jpg and .png; c, d have none
    assert sequences(tmp_path / "out") == {"u1": ["a", "b", "d", "c"], "u2": ["d", "a", "b"]}  # ties: file order
    u1 = next(s for s in all_samples(tmp_path / "out", "seqs") if s.id == "u1")
    assert u1.timestamps == (10.0, 20.0, 20.0, 30.0)


def test_images_argument_replaces_posters_folder(tmp_path: Path) -> None:
    folder = write_recbole(tmp_path / "toy", INTER, ITEM, {"posters/b.jpg": jpeg((0, 9, 0))})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "c.jpeg").write_bytes(jpeg((0, 0, 9)))
    build(folder, tmp_path / "out", opts(images=str(elsewhere)), progress=False)
    items = {it.id: it for it in all_samples(tmp_path / "out", "items")}
    assert [k for k, it in items.items() if it.image is not None] == ["c"]


def test_no_timestamp_column_and_no_title(tmp_path: Path) -> None:
    """Yelp-like: the item id is business_id (the token column both files share); file order is time order."""
    inter = [tsv("review_id:token", "user_id:token", "business_id:token", "stars:float")]
    inter += [tsv(f"r{n}", "u1", b, "5") for n, b in enumerate(["z", "y", "x", "y"])]
    item = [tsv("business_id:token", "item_name:token_seq", "city:token_seq", "stars:float")]
    item += [tsv("x", "Ex Bar", "Oslo", "4"), tsv("y", "Why Cafe", "", "3"), tsv("z", "Zed", "Rome", "1")]
    manifest = build(write_recbole(tmp_path / "toy", inter, item), tmp_path / "out", opts(), progress=False)
    assert manifest["timestamps"] is False and manifest["skipped"] == []
    assert sequences(tmp_path / "out") == {"u1": ["z", "y", "x", "y"]}
    (seq,) = all_samples(tmp_path / "out", "seqs")
    assert seq.timestamps is None
    assert [it.text for it in seq.items] == ["Zed. Rome.", "Why Cafe.", "Ex Bar. Oslo."]


def test_bad_records_are_counted_skips(tmp_path: Path) -> None:
    inter = [tsv("user_id:token", "item_id:token", "rating:float", "timestamp:float")]
    inter += [
        tsv("u1", "a", "5", "1"),
        tsv("u1", "b", "5"),  # 3: a field short
        tsv("u1", "zzz", "5", "3"),  # 4: unknown item
        tsv("u1", "b", "5", "x"),  # 5: bad timestamp
        b"u1\tc\t5\t4\xff",  # 6: not UTF-8
        tsv("", "a", "5", "5"),  # 7: no user
        tsv("u1", "c", "5", "6"),
        "",  # blank lines are ignored
        tsv("u1", "d", "5", "7"),
    ]
    item = [tsv("item_id:token", "title:token_seq")]
    item += [tsv("a", "Alpha"), "b", b"c\tCaf\xe9", tsv("", "No id"), tsv("c", "Gamma"), tsv("d", "Delta")]
    item += [tsv("a", "Again")]
    manifest = build(write_recbole(tmp_path / "toy", inter, item), tmp_path / "out", opts(), progress=False)
    skipped = {(s["file"], s["line"], s["field"]): s["reason"] for s in manifest["skipped"]}
    expect = {
        ("toy.item", 3, None): "malformed row: 1 fields, header has 2",
        ("toy.item", 4, None): "not UTF-8",
        ("toy.item", 5, "item_id"): "empty value",
        ("toy.item", 8, "id"): "duplicate item id: 'a'",
        ("toy.inter", 3, None): "malformed row: 3 fields, header has 4",
        ("toy.inter", 4, "item"): "unknown item id: 'zzz'",
        ("toy.inter", 5, "timestamp"): "malformed timestamp",
        ("toy.inter", 6, None): "not UTF-8",
        ("toy.inter", 7, "user_id"): "empty value",
    }
    assert set(skipped) == set(expect), sorted(skipped.items(), key=str)
    for where, reason in expect.items():
        assert skipped[where].startswith(reason), (where, skipped[where])
    assert sequences(tmp_path / "out") == {"u1": ["a", "c", "d"]}


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: (d / "toy.inter").unlink(), r"expected one RecBole interactions file '\*.inter' in .*, found none"),
        (lambda d: (d / "more.inter").write_text(INTER[0]), "found more.inter, toy.inter"),
        (lambda d: (d / "toy.item").unlink(), "missing RecBole items file 'toy.item'"),
        (lambda d: (d / "toy.inter").write_text("user_id\titem_id:token\n"), "toy.inter:1: header cell 'user_id'"),
        (lambda d: (d / "toy.inter").write_text("uid:token\titem_id:token\n"), "toy.inter:1: field 'user_id'"),
        (lambda d: (d / "toy.item").write_text("iid:token\tt:token_seq\n"), "toy.item:1: cannot tell the item id"),
        (lambda d: (d / "toy.item").write_bytes(b""), "toy.item:1: empty file"),
    ],
)
def test_unusable_input_is_a_clear_error(tmp_path: Path, setup, message: str) -> None:
    folder = write_recbole(tmp_path / "toy", INTER, ITEM)
    setup(folder)
    with pytest.raises(InputError, match=message):
        build(folder, tmp_path / "out", opts(), progress=False)
    assert not (tmp_path / "out").exists()
