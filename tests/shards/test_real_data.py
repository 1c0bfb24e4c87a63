"""Builds from the real datasets of ../shared/data (see its README), checked against counts taken from the raw files.

The data is not part of the repository: point ``MOMREC_DATA`` at it, or these tests skip. Each build keeps every
interaction (``max_seq_len`` above any sequence) and the smallest k-core the builder allows (users with at least
3 interactions, items with at least 1), so the expected output is computable from the raw files by a few lines.
The two published splits (amazon-games, amazon-office) are built with default options, once per module, and their
every user's validation and test targets compared with the files'.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest
from test_build import all_samples

from shards.build import BuildOptions, build
from shards.formats import detect
from shards.inspect import verify
from shards.writer import sha256_file

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("MOMREC_DATA", REPO.parent / "shared" / "data"))
MIN_USER = 3

# users, items, interactions as the data README states them (before any filtering)
README_COUNTS = {
    "movielens-100k": (943, 1682, 100_000),
    "hm": (1364, 17_033, 31_662),
    "microlens-50k": (50_000, 19_220, 359_708),
    "amazon-games": (50_546, 16_859, 440_264),
    "amazon-office": (4_905, 2_420, 53_258),
}


def folder(name: str) -> Path:
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"real data {path} is absent (set MOMREC_DATA to the shared data folder)")
    return path


def build_real(fmt: str, name: str, out: Path) -> dict:
    opts = BuildOptions(format=fmt, min_user_interactions=MIN_USER, max_seq_len=10_000, image_size=32, workers=2)
    start = time.perf_counter()
    manifest = build(folder(name), out, opts, progress=False)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"\n{name}: built in {time.perf_counter() - start:.1f} s, {size / 2**20:.0f} MiB")
    return manifest


def sequences(out: Path) -> dict[str, list[str]]:
    return {s.id: [s.items[p].id for p in s.seq] for s in all_samples(out, "seqs")}


def expected_after_filtering(events: list[tuple[str, str]], images: set[str]) -> dict[str, int]:
    """Counts after dropping users below MIN_USER (one pass: items need only 1 interaction, so nothing cascades)."""
    per_user = Counter(user for user, _ in events)
    kept = {user for user, n in per_user.items() if n >= MIN_USER}
    items = {item for user, item in events if user in kept}
    return {
        "users": len(kept),
        "items": len(items),
        "interactions": sum(per_user[u] for u in kept),
        "items_text_and_image": len(items & images),
    }


def check_counts(manifest: dict, name: str, expected: dict[str, int]) -> None:
    counts = manifest["counts"]
    before = counts["before_filtering"]
    assert (before["users"], before["items"], before["interactions"]) == README_COUNTS[name]
    assert before["interactions_beyond_max_seq_len"] == 0
    assert {k: counts[k] for k in expected} == expected
    assert counts["items_without_content"] == counts["items_image_only"] == 0  # every item has a text
    assert counts["items_text_only"] == counts["items"] - counts["items_text_and_image"]
    assert manifest["skipped"] == []


def stable_order(rows: list[tuple[str, str, float]], kept: set[str]) -> dict[str, list[str]]:
    """Each kept user's items by time, ties in file order (Python's sort is stable)."""
    out: dict[str, list[tuple[float, str]]] = {}
    for user, item, stamp in rows:
        if user in kept:
            out.setdefault(user, []).append((stamp, item))
    return {u: [item for _, item in sorted(ev, key=lambda e: e[0])] for u, ev in out.items()}


def test_movielens_100k(tmp_path: Path) -> None:
    src = folder("movielens-100k")
    manifest = build_real("recbole", "movielens-100k", tmp_path / "out")
    lines = (src / "ml-100k.inter").read_text(encoding="utf-8").splitlines()[1:]
    rows = [(u, i, float(t)) for u, i, _, t in (line.split("\t") for line in lines)]
    posters = {p.stem for p in (src / "posters").iterdir()}
    expected = expected_after_filtering([(u, i) for u, i, _ in rows], posters)
    assert expected["items_text_and_image"] == 1641  # the README's poster count
    check_counts(manifest, "movielens-100k", expected)
    assert manifest["timestamps"] is True
    seqs = sequences(tmp_path / "out")
    assert seqs == stable_order(rows, set(seqs))  # about half the neighbours tie in time: file order decides
    toy_story = next(it for it in all_samples(tmp_path / "out", "items") if it.id == "1")
    assert toy_story.text.startswith("Toy Story. 1995. Animation Children's Comedy. A little boy named Andy")


def test_hm(tmp_path: Path) -> None:
    src = folder("hm")
    manifest = build_real("hm", "hm", tmp_path / "out")
    with open(src / "transactions_train.csv", encoding="utf-8", newline="") as f:
        rows = [(r["customer_id"], r["article_id"], r["t_dat"]) for r in csv.DictReader(f)]
    photos = {p.stem for p in (src / "images").glob("*/*.jpg")}
    assert len(photos) == 17_033
    expected = expected_after_filtering([(u, i) for u, i, _ in rows], photos)
    check_counts(manifest, "hm", expected)
    assert expected["items_text_and_image"] == expected["items"]  # every article has its photo
    seqs = sequences(tmp_path / "out")
    assert seqs == stable_order([(u, i, float(d.replace("-", ""))) for u, i, d in rows], set(seqs))
    assert any(len(set(s)) < len(s) for s in seqs.values())  # repeat purchases are kept
    ids = {it.id for it in all_samples(tmp_path / "out", "items")}
    assert all(len(i) == 10 and i.startswith("0") for i in ids)


def test_microlens_50k(tmp_path: Path) -> None:
    src = folder("microlens-50k")
    manifest = build_real("microlens", "microlens-50k", tmp_path / "out")
    (pairs,) = src.glob("*_pairs.tsv")
    order = {}
    for line in pairs.read_text(encoding="utf-8").splitlines():
        user, items = line.split("\t")
        order[user] = items.split()
    events = [(u, i) for u, items in order.items() for i in items]
    check_counts(manifest, "microlens-50k", expected_after_filtering(events, set()))
    assert manifest["timestamps"] is False
    assert sequences(tmp_path / "out") == {u: s for u, s in order.items() if len(s) >= MIN_USER}


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("amazon-games", "unisrec"), ("amazon-office", "lcrec"), ("movielens-100k", "recbole"), ("hm", "hm"),
     ("microlens-50k", "microlens")],
)  # fmt: skip
def test_detect_tells_every_real_layout(name: str, fmt: str) -> None:
    assert detect(folder(name)) == fmt


def build_published(name: str, out: Path) -> tuple[Path, dict]:
    """A build with default options (--format auto, no filter, no truncation), timed."""
    start = time.perf_counter()
    manifest = build(folder(name), out, BuildOptions(), progress=False)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"\n{name}: built in {time.perf_counter() - start:.1f} s, {size / 2**20:.0f} MiB")
    return out, manifest


@pytest.fixture(scope="module")
def games(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return build_published("amazon-games", tmp_path_factory.mktemp("games") / "out")


@pytest.fixture(scope="module")
def office(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return build_published("amazon-office", tmp_path_factory.mktemp("office") / "out")


def check_published(manifest: dict, name: str, fmt: str) -> None:
    """Nothing filtered, skipped or cut: the counts are the README's before and after, the split is intact."""
    assert manifest["format"] == fmt
    counts = manifest["counts"]
    users, items, interactions = README_COUNTS[name]
    assert counts["before_filtering"] == {
        "users": users, "items": items, "interactions": interactions, "interactions_beyond_max_seq_len": 0
    }  # fmt: skip
    assert (counts["users"], counts["items"], counts["interactions"]) == README_COUNTS[name]
    assert counts["items_text_only"] == items  # every item has a text, none an image
    assert manifest["split"] == {"kind": "published", "users": users, "users_with_published_targets": users}
    assert manifest["skipped"] == []


def read_split(path: Path) -> dict[str, tuple[list[str], str]]:
    """user -> (history, target) of a UniSRec split file."""
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        user, history, target = line.split("\t")
        rows[user] = (history.split(), target)
    return rows


def test_amazon_games_keeps_the_published_split(games: tuple[Path, dict]) -> None:
    out, manifest = games
    check_published(manifest, "amazon-games", "unisrec")
    src = folder("amazon-games")
    test, valid = read_split(src / "Games.test.inter"), read_split(src / "Games.valid.inter")
    seqs = sequences(out)
    assert set(seqs) == set(test) == set(valid)
    for user, seq in seqs.items():  # every user: the files' validation and test targets, the test row's history
        assert seq[-2:] == [valid[user][1], test[user][1]], user
        assert seq == test[user][0] + [test[user][1]], user
    texts = {it.id: it.text for it in all_samples(out, "items")}
    assert texts["0"] == "Fire Emblem: The Sacred Stones."  # UniSRec's template: the title (the only column)
    assert texts["11"] == "Phantasy Star Online, Episode I & II."  # HTML entity unescaped


def test_amazon_office_keeps_the_published_split(office: tuple[Path, dict]) -> None:
    out, manifest = office
    check_published(manifest, "amazon-office", "lcrec")
    raw = json.loads((folder("amazon-office") / "Office.inter.json").read_text(encoding="utf-8"))
    seqs = sequences(out)
    assert set(seqs) == set(raw)
    for user, seq in seqs.items():  # every user: the file's last two items are the validation and test targets
        assert seq[-2:] == [str(i) for i in raw[user][-2:]], user
        assert seq == [str(i) for i in raw[user]], user
    texts = {it.id: it.text for it in all_samples(out, "items")}
    assert texts["0"] == (
        "VTECH CS6114 DECT 6.0 Cordless Phone, White/Grey, 1 Handset. Brand: VTech. "
        "Categories: Office Electronics, Telephones & Accessories, Cordless Telephones."
    )  # LC-Rec's template; the empty description leaves nothing


@pytest.mark.parametrize("name", ["games", "office"])
def test_published_builds_verify_and_rebuild_byte_identical(name: str, request, tmp_path: Path) -> None:
    out, _ = request.getfixturevalue(name)
    assert verify(out) == []
    again, _ = build_published(f"amazon-{name}", tmp_path / "again")
    digests = [{p.name: sha256_file(p) for p in sorted(folder.iterdir())} for folder in (out, again)]
    assert digests[0] == digests[1] and "manifest.json" in digests[0]
