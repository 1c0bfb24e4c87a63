"""The mind reader on a tiny MIND split (behaviors.tsv, news.tsv), built into shards."""

from __future__ import annotations

import calendar
from pathlib import Path

import pytest

from shards import schema
from shards.build import BuildOptions, build
from shards.errors import InputError
from shards.formats.mind import parse_time
from shards.inspect import read_shard

NEWS = [
    "N1\tsports\tfootball_nfl\tBig Win\tThe home team won.\thttps://x/1\t[]\t[]",
    "N2\tnews\tnewsus\tStorm Ahead\t\thttps://x/2\t[]\t[]",  # no abstract
    'N3\tlifestyle\t\tTen Tips\tHow to "live".\thttps://x/3\t[]\t[]',  # no subcategory; quotes kept
    "N4\tsports\tgolf\tPutt\tShort.\thttps://x/4\t[]\t[]",
    "N5\tfinance\tmarkets\tStocks Up\tA rally.\thttps://x/5\t[]\t[]",
    "N6\tweather\tforecast\tSunny\tWarm.\thttps://x/6\t[]\t[]",
    "N7\tbroken row",
]
BEHAVIORS = [
    "1\tU1\t11/15/2019 8:55:22 AM\tN1 N2\tN3-1 N4-0",
    "2\tU1\t11/14/2019 9:00:00 PM\tN1 N2\tN5-1 N6-1",  # U1's earliest row: its history is taken from here
    "3\tU2\t11/15/2019 10:00:00 AM\t\tN1-1 N2-1 N3-0 N4-1",  # empty history
    "4\tU3\tyesterday\tN1\tN2-1",
    "5\tU3\t11/15/2019 10:00:00 AM\tN1",
    "6\tU2\t11/16/2019 12:05:00 AM\t\tN5-1 N6-x",
    "7\tU3\t11/13/2019 1:00:00 PM\tN3 N4 N5\tN1 N2",  # unlabelled impressions (test split): no clicks
]


def write_split(folder: Path, news: list[str] = NEWS, behaviors: list[str] = BEHAVIORS) -> Path:
    folder.mkdir(parents=True)
    (folder / "news.tsv").write_text("\n".join(news) + "\n", encoding="utf-8")
    (folder / "behaviors.tsv").write_text("\n".join(behaviors) + "\n", encoding="utf-8")
    return folder


def utc(*when: int) -> float:
    return float(calendar.timegm(when))


def test_parse_time() -> None:
    assert parse_time("11/15/2019 8:55:22 AM") == utc(2019, 11, 15, 8, 55, 22)
    assert parse_time("11/15/2019 12:05:00 AM") == utc(2019, 11, 15, 0, 5, 0)
    assert parse_time("1/2/2019 12:05:00 PM") == utc(2019, 1, 2, 12, 5, 0)
    assert parse_time("13/15/2019 8:55:22 AM") is None and parse_time("2019-11-15 08:55:22") is None


def test_history_then_clicks_in_time_order(tmp_path: Path) -> None:
    folder = write_split(tmp_path / "MINDsmall_train")
    out = tmp_path / "out"
    manifest = build(folder, out, BuildOptions(format="mind", min_user_interactions=3), progress=False)
    m = schema.load_manifest(out)
    items = {it.id: it for s in m.shards("items") for it in map(schema.decode_item, read_shard(out / s.name))}
    seqs = {sq.id: sq for s in m.shards("seqs") for sq in map(schema.decode_seq, read_shard(out / s.name))}
    ids = {u: [s.items[p].id for p in s.seq] for u, s in seqs.items()}
    # history once (not once per row), then row 2's clicks, then row 1's (row 2 is earlier)
    assert ids["U1"] == ["N1", "N2", "N5", "N6", "N3"]
    first = utc(2019, 11, 14, 21, 0, 0)
    assert seqs["U1"].timestamps == (first - 2, first - 1, first, first, utc(2019, 11, 15, 8, 55, 22))
    assert ids["U2"] == ["N1", "N2", "N4", "N5"]  # empty history: clicks only
    assert ids["U3"] == ["N3", "N4", "N5"]  # history only (no labelled clicks)
    assert items["N1"].text == "Big Win. sports, football_nfl. The home team won."
    assert items["N2"].text == "Storm Ahead. news, newsus." and items["N3"].text == 'Ten Tips. How to "live".'
    assert all(it.image is None for it in items.values())
    got = {(s["file"], s["line"], s["field"]): s["reason"] for s in manifest["skipped"]}
    assert got == {
        ("news.tsv", 7, None): "malformed row: 2 fields, expected 8",
        ("behaviors.tsv", 4, "time"): "malformed time: 'yesterday'",
        ("behaviors.tsv", 5, None): "malformed row: 4 fields, expected 5",
        ("behaviors.tsv", 6, "impressions"): "malformed impression: 'N6-x' (1 in this row)",
    }


def test_unusable_folders_are_clear_errors(tmp_path: Path) -> None:
    write_split(tmp_path / "MIND" / "train")
    write_split(tmp_path / "MIND" / "dev")
    opts = BuildOptions(format="mind", min_user_interactions=3)
    with pytest.raises(InputError, match="subfolders dev, train do: pass one split folder"):
        build(tmp_path / "MIND", tmp_path / "out", opts, progress=False)
    (tmp_path / "MIND" / "train" / "news.tsv").unlink()
    with pytest.raises(InputError, match="missing MIND news file 'news.tsv'"):
        build(tmp_path / "MIND" / "train", tmp_path / "out", opts, progress=False)
    with pytest.raises(InputError, match="no images"):
        build(tmp_path / "MIND" / "dev", tmp_path / "out", BuildOptions(format="mind", images=str(tmp_path)))
