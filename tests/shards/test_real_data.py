"""Builds from the real datasets of ../shared/data (see its README), checked against counts taken from the raw files.

The data is not part of the repository: point ``MOMREC_DATA`` at it, or these tests skip. Each build keeps every
interaction (``max_seq_len`` above any sequence) and the smallest k-core the builder allows (users with at least
3 interactions, items with at least 1), so the expected output is computable from the raw files by a few lines.
"""

from __future__ import annotations

import csv
import os
import time
from collections import Counter
from pathlib import Path

import pytest
from test_build import all_samples

from shards.build import BuildOptions, build

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("MOMREC_DATA", REPO.parent / "shared" / "data"))
MIN_USER = 3

# users, items, interactions as the data README states them (before any filtering)
README_COUNTS = {
    "movielens-100k": (943, 1682, 100_000),
    "hm": (1364, 17_033, 31_662),
    "microlens-50k": (50_000, 19_220, 359_708),
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
