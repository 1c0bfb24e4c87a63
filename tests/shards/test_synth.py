"""The synthetic dataset: deterministic, in the generic format, with learnable shared topics."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.synth import DEFAULT_DOMAINS, TOPICS, plan_domain, synthesize

SMALL = dict(users_per_domain=30, items_per_domain=40, n_topics=4, image_size=32)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _items(folder: Path) -> list[dict]:
    with open(folder / "items.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _interactions(folder: Path) -> tuple[list[str], list[tuple[str, str, int]]]:
    with open(folder / "interactions.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [(u, i, int(t)) for u, i, t in rows[1:]]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return synthesize(tmp_path_factory.mktemp("synth"), seed=3, **SMALL)


def test_returns_the_domain_folders_and_leaves_no_temporaries(written: list[Path]) -> None:
    assert [p.name for p in written] == list(DEFAULT_DOMAINS)
    assert sorted(p.name for p in written[0].parent.iterdir()) == sorted(DEFAULT_DOMAINS)
    for folder in written:
        assert sorted(p.name for p in folder.iterdir()) == ["images", "interactions.csv", "items.jsonl"]


def test_same_arguments_give_byte_identical_files(tmp_path: Path, written: list[Path]) -> None:
    again = synthesize(tmp_path / "again", seed=3, **SMALL)
    for a, b in zip(written, again):
        assert _files(a) == _files(b)
    other = synthesize(tmp_path / "other", seed=4, domains=["books"], **SMALL)
    assert _files(other[0]) != _files(written[0])


def test_a_domain_does_not_depend_on_the_other_domains(tmp_path: Path, written: list[Path]) -> None:
    (alone,) = synthesize(tmp_path, seed=3, domains=["movies"], **SMALL)
    assert _files(alone) == _files(written[1])


def test_items_jsonl_follows_the_generic_format(written: list[Path]) -> None:
    for folder in written:
        items = _items(folder)
        assert len(items) == SMALL["items_per_domain"]
        ids = [it["id"] for it in items]
        assert len(set(ids)) == len(ids) and all(isinstance(i, str) and i.isalnum() for i in ids)
        for it in items:
            assert set(it) in (
                {"id", "title", "description", "category", "image"},
                {"id", "image"},
                {"id", "title", "description", "category"},
            )
            if "image" in it:
                with Image.open(folder / it["image"]) as im:
                    assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (32, 32))
        referenced = {it["image"] for it in items if "image" in it}
        assert {f"images/{p.name}" for p in (folder / "images").iterdir()} == referenced


def test_id_styles_differ_by_domain(written: list[Path]) -> None:
    first = {folder.name: _items(folder)[0]["id"] for folder in written}
    assert first == {"books": "B000001", "movies": "m1", "fashion": "0718000000"}


def test_interactions_csv_follows_the_generic_format(written: list[Path]) -> None:
    for folder in written:
        header, rows = _interactions(folder)
        assert header == ["user", "item", "timestamp"]
        assert (folder / "interactions.csv").read_text(encoding="utf-8").startswith("user,item,timestamp\n")
        assert {i for _, i, _ in rows} == {it["id"] for it in _items(folder)}  # every item is used, none unknown
        users = [u for u, _, _ in rows]
        assert len(set(users)) == SMALL["users_per_domain"]
        blocks = [u for k, u in enumerate(users) if k == 0 or users[k - 1] != u]
        assert len(blocks) == len(set(blocks)), "rows are grouped by user"
        assert 5 <= min(Counter(users).values()) and max(Counter(users).values()) <= 30
        ties = 0
        for k in range(1, len(rows)):
            if rows[k][0] == rows[k - 1][0]:
                assert rows[k][2] >= rows[k - 1][2]
                ties += rows[k][2] == rows[k - 1][2]
        assert ties > 0


def test_every_domain_mixes_modalities(written: list[Path]) -> None:
    for folder in written:
        kinds = Counter(("title" in it, "image" in it) for it in _items(folder))
        assert kinds[(True, False)] >= 1 and kinds[(False, True)] >= 1 and kinds[(True, True)] >= 1
        assert kinds[(True, True)] > kinds[(True, False)] + kinds[(False, True)]


def test_plan_is_what_was_written(written: list[Path]) -> None:
    for folder in written:
        plan = plan_domain(folder.name, seed=3, **{k: v for k, v in SMALL.items() if k != "image_size"})
        assert [it.id for it in plan.items] == [it["id"] for it in _items(folder)]
        planned = [
            (u, plan.items[i].id, t)
            for u, seq, ts in zip(plan.users, plan.sequences, plan.timestamps)
            for i, t in zip(seq, ts)
        ]
        assert planned == _interactions(folder)[1]


def test_users_follow_their_topics() -> None:
    n_topics = 8
    plan = plan_domain("books", users_per_domain=60, items_per_domain=80, n_topics=n_topics, seed=1)
    share = [np.mean([plan.items[i].topic == ts[0] for i in seq]) for seq, ts in zip(plan.sequences, plan.user_topics)]
    assert np.mean(share) > 3 / n_topics  # chance is about 1/n_topics
    popularity = Counter(i for seq in plan.sequences for i in seq)
    assert max(popularity.values()) > 3 * np.mean(list(popularity.values()))  # popular items exist


def test_text_and_images_carry_the_topic(written: list[Path]) -> None:
    n_topics = SMALL["n_topics"]
    for folder in written:
        plan = plan_domain(folder.name, seed=3, **{k: v for k, v in SMALL.items() if k != "image_size"})
        topic_of = {it.id: it.topic for it in plan.items}
        colours, labels = [], []
        for it in _items(folder):
            if "title" in it:
                words = set((it["title"] + " " + it["description"]).lower().replace(":", " ").split())
                overlap = [len(words & set(TOPICS[t].words)) for t in range(n_topics)]
                assert int(np.argmax(overlap)) == topic_of[it["id"]]
            if "image" in it:
                with Image.open(folder / it["image"]) as im:
                    colours.append(np.asarray(im, dtype=np.float64).mean(axis=(0, 1)))
                labels.append(topic_of[it["id"]])
        colours_n3, labels_n = np.array(colours), np.array(labels)
        centroids_t3 = np.stack([colours_n3[labels_n == t].mean(axis=0) for t in range(n_topics)])
        nearest = np.argmin(((colours_n3[:, None] - centroids_t3[None]) ** 2).sum(-1), axis=1)
        assert np.mean(nearest == labels_n) > 0.9  # mean colour alone nearly tells the topic


def test_rewriting_replaces_an_existing_domain(tmp_path: Path) -> None:
    (folder,) = synthesize(tmp_path, domains=["books"], **SMALL)
    (folder / "stale.txt").write_text("old")
    (folder,) = synthesize(tmp_path, domains=["books"], progress=True, **SMALL)
    assert not (folder / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["books"]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(domains=[]),
        dict(domains="books"),
        dict(domains=["books", "books"]),
        dict(domains=["bad/name"]),
        dict(domains=["has space"]),
        dict(domains=[".hidden"]),
        dict(users_per_domain=0),
        dict(items_per_domain=3, n_topics=4),
        dict(n_topics=0),
        dict(n_topics=len(TOPICS) + 1),
        dict(image_size=4),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        synthesize(tmp_path / "out", **{**SMALL, **kwargs})
    assert not (tmp_path / "out").exists()  # nothing written
