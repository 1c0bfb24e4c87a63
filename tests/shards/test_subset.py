"""Nested user subsets (python -m shards subset): nesting, determinism, the shared catalog, recomputed counts."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from shards.__main__ import main
from shards.build import BuildOptions, build
from shards.errors import InputError
from shards.inspect import verify
from shards.schema import load_manifest
from shards.subset import catalog_id, subset, user_order
from shards.synth import synthesize


@pytest.fixture(scope="module")
def domain(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("subset")
    (src,) = synthesize(root / "src", domains=["books"], users_per_domain=40, items_per_domain=30, n_topics=3)
    out = root / "books"
    build(src, out, BuildOptions(min_user_interactions=3, image_size=32, samples_per_shard=8), progress=False)
    return out


def _users(folder: Path) -> list[str]:
    """The user ids in the sequences shards, read with the standard library's tarfile."""
    ids = []
    for shard in load_manifest(folder).seq_shards:
        with tarfile.open(folder / shard.name) as tar:
            ids += [json.loads(tar.extractfile(m).read())["id"] for m in tar if m.name.endswith(".json")]
    return ids


def test_subsets_are_nested_deterministic_and_seeded(domain: Path, tmp_path: Path) -> None:
    chosen = {}
    for seed in (0, 1):
        for fraction in (0.25, 0.5, 1.0):
            out = tmp_path / f"s{seed}-{fraction}"
            subset(domain, out, fraction, seed, progress=False)
            chosen[seed, fraction] = set(_users(out))
            assert len(chosen[seed, fraction]) == round(fraction * 40)
            assert verify(out) == []  # a valid build: checksums, counts, user indices 0..n-1
    for seed in (0, 1):
        assert chosen[seed, 0.25] < chosen[seed, 0.5] < chosen[seed, 1.0] == set(_users(domain))
    assert chosen[0, 0.25] != chosen[1, 0.25]  # the seed draws another subset
    again = tmp_path / "again"
    subset(domain, again, 0.25, 0, progress=False)
    assert (again / "seqs-000000.tar").read_bytes() == (tmp_path / "s0-0.25" / "seqs-000000.tar").read_bytes()
    assert user_order(["b", "a", "c"], "books", 0) == user_order(["c", "a", "b"], "books", 0)


def test_subset_keeps_the_catalog_and_recounts_users(domain: Path, tmp_path: Path) -> None:
    out = tmp_path / "quarter"
    subset(domain, out, 0.25, 0, progress=False)
    parent, child = load_manifest(domain), load_manifest(out)
    assert catalog_id(out) == catalog_id(domain)
    assert (child.domain, child.n_items, child.item_shards) == (parent.domain, parent.n_items, parent.item_shards)
    for shard in parent.item_shards:  # hard links: the catalog is not copied
        assert os.path.samefile(domain / shard.name, out / shard.name)
    assert child.n_users == 10
    # popularity counts training interactions only: every user's last two are the evaluation targets
    assert sum(child.popularity) == child.n_interactions - 2 * child.n_users
    assert all(c <= p for c, p in zip(child.popularity, parent.popularity))
    assert child.raw["subset"] | {"parent_manifest_sha256": ""} == {
        "parent": str(domain.resolve()), "parent_manifest_sha256": "", "fraction": 0.25, "seed": 0, "users": 10,
        "parent_users": 40,
    }  # fmt: skip


def test_another_build_has_another_catalog_id(domain: Path, tmp_path: Path) -> None:
    (src,) = synthesize(tmp_path / "src", domains=["books"], users_per_domain=40, items_per_domain=31, n_topics=3)
    other = tmp_path / "other"
    build(src, other, BuildOptions(min_user_interactions=3, image_size=32), progress=False)
    assert catalog_id(other) != catalog_id(domain)


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_a_fraction_outside_0_1_is_an_error(domain: Path, tmp_path: Path, fraction: float) -> None:
    with pytest.raises(InputError, match="fraction must be in"):
        subset(domain, tmp_path / "x", fraction)
    assert not (tmp_path / "x").exists()


def test_cli_writes_a_subset_and_refuses_to_overwrite(domain: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    assert main(["subset", str(domain), "--fraction", "0.5", "--out", str(out)]) == 0
    assert "users 20" in capsys.readouterr().out
    assert main(["subset", str(domain), "--fraction", "0.5", "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["subset", str(tmp_path / "nowhere"), "--fraction", "0.5", "--out", str(tmp_path / "y")]) == 2
    assert "no manifest" in capsys.readouterr().err
