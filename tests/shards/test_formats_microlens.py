"""The MicroLens reader on hand-written files: ordered pairs without time, CSV-quoted titles, covers, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_build import all_samples, jpeg

from shards.build import BuildOptions, build
from shards.errors import InputError

PAIRS = ["1\t10 20 30", "2\t30 10 20 40", "3\t40 40 20"]  # user 3 repeats item 40
TITLES = [
    "item,title",
    '10,"Hello, world # tag"',
    '20,"He said ""hi"", then left"',
    "30,plain title",
    '40,"""Quoted"" start"',
]


def write_microlens(
    folder: Path, pairs: list[str | bytes], titles: list[str | bytes], images: dict[str, bytes]
) -> Path:
    """MicroLens-toy_pairs.tsv (CRLF line ends, as published) and MicroLens-toy_titles.csv; images by path."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in (("MicroLens-toy_pairs.tsv", pairs), ("MicroLens-toy_titles.csv", titles)):
        data = [x.encode() if isinstance(x, str) else x for x in lines]
        (folder / name).write_bytes(b"\r\n".join(data) + b"\r\n")
    for rel, data in images.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def opts(**kw) -> BuildOptions:
    return BuildOptions(**{"format": "microlens", "min_user_interactions": 3, "image_size": 32, **kw})


def test_order_titles_and_covers(tmp_path: Path) -> None:
    covers = {"covers/10.jpg": jpeg((1, 1, 1)), "covers/30.jpeg": jpeg((2, 2, 2))}
    manifest = build(write_microlens(tmp_path / "ml", PAIRS, TITLES, covers), tmp_path / "out", opts(), progress=False)
    assert manifest["skipped"] == [] and manifest["timestamps"] is False
    items = {it.id: it for it in all_samples(tmp_path / "out", "items")}
    assert {k: it.text for k, it in items.items()} == {
        "10": "Hello, world # tag",
        "20": 'He said "hi", then left',
        "30": "plain title",
        "40": '"Quoted" start',
    }
    assert [k for k, it in items.items() if it.image is not None] == ["10", "30"]
    seqs = {s.id: s for s in all_samples(tmp_path / "out", "seqs")}
    assert {u: [s.items[p].id for p in s.seq] for u, s in seqs.items()} == {
        "1": ["10", "20", "30"],
        "2": ["30", "10", "20", "40"],
        "3": ["40", "40", "20"],
    }
    assert all(s.timestamps is None for s in seqs.values())


def test_images_argument(tmp_path: Path) -> None:
    folder = write_microlens(tmp_path / "ml", PAIRS, TITLES, {"covers/10.jpg": jpeg((1, 1, 1))})
    elsewhere = tmp_path / "covers-elsewhere"
    elsewhere.mkdir()
    (elsewhere / "40.png").write_bytes(b"not an image at all")  # found, then counted as unreadable
    (elsewhere / "20.jpg").write_bytes(jpeg((5, 5, 5)))
    manifest = build(folder, tmp_path / "out", opts(images=str(elsewhere)), progress=False)
    assert [(s["file"], s["field"]) for s in manifest["skipped"]] == [("40.png", "image")]
    assert [it.id for it in all_samples(tmp_path / "out", "items") if it.image is not None] == ["20"]


def test_bad_records_are_counted_skips(tmp_path: Path) -> None:
    pairs = [
        "1\t10 20 30",
        "2 10 20 30",  # 2: no tab
        "3\t",  # 3: no items
        "\t10 20 30",  # 4: no user
        b"4\t10 2\xff0 30",  # 5: not UTF-8
        "5\t10 99 20 30",  # 6: unknown item 99
        "6\t10\t20",  # 7: two tabs
    ]
    titles = ["item,title", "10,ten", "20,twenty,extra", b"30,caf\xe9", ",no id", "20,twenty", "30,thirty"]
    manifest = build(write_microlens(tmp_path / "ml", pairs, titles, {}), tmp_path / "out", opts(), progress=False)
    skipped = {(s["file"], s["line"], s["field"]): s["reason"] for s in manifest["skipped"]}
    expect = {
        ("MicroLens-toy_titles.csv", 3, None): "malformed row: 3 fields, header has 2",
        ("MicroLens-toy_titles.csv", 4, None): "not UTF-8",
        ("MicroLens-toy_titles.csv", 5, "item"): "empty value",
        ("MicroLens-toy_pairs.tsv", 2, None): "malformed row: 1 fields",
        ("MicroLens-toy_pairs.tsv", 3, "items"): "empty value",
        ("MicroLens-toy_pairs.tsv", 4, "user"): "empty value",
        ("MicroLens-toy_pairs.tsv", 5, None): "not UTF-8",
        ("MicroLens-toy_pairs.tsv", 6, "item"): "unknown item id: '99'",
        ("MicroLens-toy_pairs.tsv", 7, None): "malformed row: 3 fields",
    }
    assert set(skipped) == set(expect), sorted(skipped.items(), key=str)
    for where, reason in expect.items():
        assert skipped[where].startswith(reason), (where, skipped[where])
    seqs = {s.id: [s.items[p].id for p in s.seq] for s in all_samples(tmp_path / "out", "seqs")}
    assert seqs == {"1": ["10", "20", "30"], "5": ["10", "20", "30"]}  # the unknown item alone is left out


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: (d / "Other_pairs.tsv").write_text("1\t10\n"), "found MicroLens-toy_pairs.tsv, Other_pairs.tsv"),
        (lambda d: (d / "MicroLens-toy_titles.csv").unlink(), r"expected one MicroLens titles file '\*_titles.csv'"),
        (lambda d: (d / "MicroLens-toy_titles.csv").write_text("id,name\n"), "titles.csv:1: header .* lacks"),
    ],
)
def test_unusable_input_is_a_clear_error(tmp_path: Path, setup, message: str) -> None:
    folder = write_microlens(tmp_path / "ml", PAIRS, TITLES, {})
    setup(folder)
    with pytest.raises(InputError, match=message):
        build(folder, tmp_path / "out", opts(), progress=False)
