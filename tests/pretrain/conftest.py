"""Shared fixtures of the pretrain tests: tiny shards of two synthetic domains, built once per session."""

from __future__ import annotations

import pytest

from shards.build import BuildOptions, build
from shards.synth import synthesize


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> list[str]:
    """Two built domains (books, movies): 30 users, 40 items each, 32 px images."""
    root = tmp_path_factory.mktemp("pretrain-shards")
    out = []
    for src in synthesize(
        root / "src", domains=["books", "movies"], users_per_domain=30, items_per_domain=40, n_topics=4
    ):
        opts = BuildOptions(min_user_interactions=3, image_size=32, samples_per_shard=16)
        build(src, root / "shards" / src.name, opts, progress=False)
        out.append(str(root / "shards" / src.name))
    return out
