"""The amazon2018 and amazon2023 readers on tiny files in the publishers' layouts, built into shards."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from shards import schema
from shards.build import BuildOptions, build
from shards.errors import InputError
from shards.inspect import read_shard


def write_lines(path: Path, lines: list, gz: bool = False) -> Path:
    """Dicts become JSON lines, str and bytes are written as they are; gzipped (by content) if ``gz``."""
    data = b"\n".join(json.dumps(x).encode() if isinstance(x, dict) else x if isinstance(x, bytes) else x.encode()
                      for x in lines) + b"\n"  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = io.BytesIO()
    Image.new("RGB", (40, 20), (200, 30, 30)).save(out, "JPEG")
    path.write_bytes(out.getvalue())


def built(folder: Path, fmt: str) -> tuple[dict, dict[str, schema.Item], dict[str, schema.Sequence]]:
    """Build ``folder``; the manifest, the items by id and the sequences by user read back from the shards."""
    out = folder.parent / f"{folder.name}-out"
    manifest = build(folder, out, BuildOptions(format=fmt, min_user_interactions=3, image_size=32), progress=False)
    m = schema.load_manifest(out)
    items = {it.id: it for s in m.shards("items") for it in map(schema.decode_item, read_shard(out / s.name))}
    seqs = {sq.id: sq for s in m.shards("seqs") for sq in map(schema.decode_seq, read_shard(out / s.name))}
    return manifest, items, seqs


def order(seq: schema.Sequence) -> list[str]:
    return [seq.items[p].id for p in seq.seq]


def skipped(manifest: dict) -> dict[tuple, str]:
    return {(s["file"], s["line"], s["field"]): s["reason"] for s in manifest["skipped"]}


def assert_skips(manifest: dict, expect: dict[tuple, str]) -> None:
    got = skipped(manifest)
    assert set(got) == set(expect), sorted(got.items(), key=str)
    for where, reason in expect.items():
        assert got[where].startswith(reason), (where, got[where])


META_2018 = [
    {"asin": "A", "title": "Alpha <b>Book</b> &amp; Co", "brand": "Acme", "category": ["Books", "Poetry"],
     "feature": ["f1"], "description": ["<p>Para one.</p>", "Para two."], "imageURL": ["http://x/a.jpg"]},
    "{'asin': 'B', 'title': 'Beta', 'category': ['Books'], 'description': \"It's good\", 'price': '$3'}",
    {"asin": "C", "brand": "Cee", "description": "No title here."},  # no title: kept, text from the rest
    {"asin": "D", "title": "", "feature": ["x", "y"]},  # empty title
    '{"asin": "E", "title": ',  # neither JSON nor a Python literal
    {"title": "no asin"},
]  # fmt: skip


def review(user: str, item: str | None, when: object) -> dict:
    rec = {"reviewerID": user, "overall": 5.0, "unixReviewTime": when, "reviewText": "ok", "reviewTime": "x"}
    return rec | ({"asin": item} if item is not None else {})


@pytest.mark.parametrize("gz", [False, True])
def test_2018_reviews_and_meta_quirks(tmp_path: Path, gz: bool) -> None:
    folder = tmp_path / "Books"
    suffix = ".gz" if gz else ""
    write_lines(folder / f"meta_Books.json{suffix}", META_2018, gz)
    reviews = [review("u1", "A", 30), review("u1", "B", 10), review("u1", "C", 20),
               review("u2", "D", 1), review("u2", "A", 2), review("u2", "B", 3),
               "not json", review("u2", None, 4), review("u2", "C", "soon")]  # fmt: skip
    write_lines(folder / f"Books_5.json{suffix}", reviews, gz)
    write_jpeg(folder / "images" / "A.jpg")
    manifest, items, seqs = built(folder, "amazon2018")
    assert items["A"].text == "Alpha Book & Co. Brand: Acme. Categories: Books, Poetry. f1 Para one. Para two."
    assert items["B"].text == "Beta. Categories: Books. It's good"  # the single-quoted line
    assert items["C"].text == "Brand: Cee. No title here." and items["D"].text == "x, y"
    assert items["A"].image is not None and items["B"].image is None
    assert order(seqs["u1"]) == ["B", "C", "A"] and seqs["u1"].timestamps == (10.0, 20.0, 30.0)
    assert order(seqs["u2"]) == ["D", "A", "B"]
    meta, rev = f"meta_Books.json{suffix}", f"Books_5.json{suffix}"
    assert_skips(manifest, {
        (meta, 5, None): "malformed line: neither a JSON object nor a Python dict literal",
        (meta, 6, "asin"): "missing or not a string",
        (rev, 7, None): "malformed JSON",
        (rev, 8, "asin"): "missing or not a string",
        (rev, 9, "unixReviewTime"): "malformed timestamp: 'soon'",
    })  # fmt: skip


@pytest.mark.parametrize(
    ("name", "user_first", "gz"),
    [("Books.csv", False, False), ("Books.csv.gz", False, True), ("ratings_Books.csv", True, False)],
)
def test_2018_ratings_csv_without_header(tmp_path: Path, name: str, user_first: bool, gz: bool) -> None:
    """2018 ratings files are item,user,rating,timestamp; the 2014 release's ratings_*.csv are user,item,..."""
    folder = tmp_path / "Books"
    write_lines(folder / "meta_Books.json", [{"asin": k, "title": k.lower()} for k in "ABC"])
    triples = [("u1", "A", 3), ("u1", "B", 1), ("u1", "C", 2), ("u2", "C", 5), ("u2", "A", 5), ("u2", "B", 6)]
    rows = [f"{u},{i},5.0,{t}" if user_first else f"{i},{u},5.0,{t}" for u, i, t in triples]
    rows += ["A,u3,5.0", "A,u3,5.0,later", ",u3,4.0,1" if not user_first else "u3,,4.0,1"]
    write_lines(folder / name, rows, gz)
    manifest, items, seqs = built(folder, "amazon2018")
    assert order(seqs["u1"]) == ["B", "C", "A"] and seqs["u1"].timestamps == (1.0, 2.0, 3.0)
    assert order(seqs["u2"]) == ["C", "A", "B"]  # equal times keep file order
    assert items["A"].text == "a."
    assert_skips(manifest, {
        (name, 7, None): "malformed row: 3 fields, expected 4",
        (name, 8, "timestamp"): "malformed timestamp: 'later'",
        (name, 9, "item"): "empty value",
    })  # fmt: skip


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["meta_Books.json", "Books.csv", "Books_5.json"], "expected one ratings or reviews file .* found Books.csv, "),
        (["Books_5.json"], "expected one item meta file 'meta_.*found none"),
        (["meta_Books.json"], "expected one ratings or reviews file '\\*.csv' or .*found none"),
    ],
)
def test_2018_unusable_folder_is_a_clear_error(tmp_path: Path, files: list[str], message: str) -> None:
    for name in files:
        write_lines(tmp_path / "Books" / name, [])
    with pytest.raises(InputError, match=message):
        built(tmp_path / "Books", "amazon2018")


def test_truncated_gzip_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "Books"
    path = write_lines(folder / "meta_Books.json.gz", [{"asin": f"A{i}", "title": "t" * 50} for i in range(50)], True)
    path.write_bytes(path.read_bytes()[:-30])
    write_lines(folder / "Books.csv", ["A1,u1,5.0,1"])
    with pytest.raises(InputError, match="meta_Books.json.gz: corrupt or truncated gzip data after line"):
        built(folder, "amazon2018")


META_2023 = [
    {"main_category": "All Beauty", "title": "Pure Soap", "average_rating": 4.5, "rating_number": 10,
     "features": ["Gentle", "Vegan"], "description": ["Made by hand.", "Smells nice."], "price": 9.5,
     "images": [{"thumb": "t", "large": "l", "hi_res": None, "variant": "MAIN"}], "videos": [],
     "store": "SoapCo", "categories": [], "details": {"Brand": "SoapCo"}, "parent_asin": "P1"},
    {"title": None, "features": [], "description": ["Untitled lotion."], "store": "LotionCo", "images": [],
     "details": {}, "parent_asin": "P2", "categories": ["Beauty", "Lotions"]},
    {"title": "Gel", "store": "", "images": [], "details": {}, "parent_asin": "P3"},
    b'{"title": "broken", ',
    {"title": "no parent", "images": []},
]  # fmt: skip


def review23(user: str, asin: str, parent: str | None, ms: object) -> dict:
    rec = {"rating": 5.0, "title": "t", "text": "x", "images": [], "asin": asin, "user_id": user, "timestamp": ms,
           "helpful_vote": 0, "verified_purchase": True}  # fmt: skip
    return rec | ({"parent_asin": parent} if parent is not None else {})


@pytest.mark.parametrize("gz", [False, True])
def test_2023_parent_asin_keys_and_millisecond_times(tmp_path: Path, gz: bool) -> None:
    folder = tmp_path / "All_Beauty"
    suffix = ".gz" if gz else ""
    write_lines(folder / f"meta_All_Beauty.jsonl{suffix}", META_2023, gz)
    reviews = [review23("u1", "V1a", "P1", 1588615855070), review23("u1", "V2", "P2", 1588615800000),
               review23("u1", "V3", "P3", 1588615900500), review23("u2", "V1b", "P1", 1000),
               review23("u2", "P3", "P3", 3000), review23("u2", "V2", "P2", 2000),
               review23("u2", "V2", None, 4000), review23("u2", "V2", "P2", None), "{oops"]  # fmt: skip
    write_lines(folder / f"All_Beauty.jsonl{suffix}", reviews, gz)
    write_jpeg(folder / "images" / "P1.jpg")
    write_jpeg(folder / "images" / "V2.jpg")  # images are keyed by parent_asin: a variant's file is not used
    manifest, items, seqs = built(folder, "amazon2023")
    assert set(items) == {"P1", "P2", "P3"}  # variants V1a and V1b are one item
    assert items["P1"].text == "Pure Soap. Store: SoapCo. Gentle, Vegan Made by hand. Smells nice."
    assert items["P2"].text == "Store: LotionCo. Categories: Beauty, Lotions. Untitled lotion."  # no title
    assert items["P1"].image is not None and items["P2"].image is None
    assert order(seqs["u1"]) == ["P2", "P1", "P3"]
    assert seqs["u1"].timestamps == (1588615800.0, 1588615855.07, 1588615900.5)
    assert order(seqs["u2"]) == ["P1", "P2", "P3"] and seqs["u2"].timestamps == (1.0, 2.0, 3.0)
    meta, rev = f"meta_All_Beauty.jsonl{suffix}", f"All_Beauty.jsonl{suffix}"
    assert_skips(manifest, {
        (meta, 4, None): "malformed JSON",
        (meta, 5, "parent_asin"): "missing or not a string",
        (rev, 7, "parent_asin"): "missing or not a string",
        (rev, 8, "timestamp"): "missing timestamp",
        (rev, 9, None): "malformed JSON",
    })  # fmt: skip


def test_2023_missing_reviews_is_a_clear_error(tmp_path: Path) -> None:
    write_lines(tmp_path / "Cat" / "meta_Cat.jsonl", META_2023[:1])
    with pytest.raises(InputError, match="expected one reviews file '\\*.jsonl' or '\\*.jsonl.gz' in .* found none"):
        built(tmp_path / "Cat", "amazon2023")
