"""Shared fixtures of the finetune tests: tiny shards of two source domains and one target domain, and a tiny
model pretrained on the sources for 2 steps (launch/configs/tiny.toml, in-process), built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shards.build import BuildOptions, build
from shards.synth import synthesize
from tests.testutil import TINY, lone_env, tiny_overrides


@pytest.fixture(scope="session")
def domains(tmp_path_factory) -> dict[str, list[str]]:
    """{"source": [books, movies], "target": [fashion]}: 30 users and 40 items each, 32 px images."""
    root = tmp_path_factory.mktemp("finetune-shards")
    built = []
    for src in synthesize(root / "src", domains=["books", "movies", "fashion"], users_per_domain=30,
                          items_per_domain=40, n_topics=4):  # fmt: skip
        opts = BuildOptions(min_user_interactions=3, image_size=32, samples_per_shard=16)
        build(src, root / "shards" / src.name, opts, progress=False)
        built.append(str(root / "shards" / src.name))
    return {"source": built[:2], "target": built[2:]}


@pytest.fixture(scope="session")
def pretrained(domains, tmp_path_factory) -> Path:
    """The export (model/ folder) of tiny.toml trained 2 steps on the source domains."""
    from pretrain.config import load_config
    from pretrain.distributed import shutdown
    from pretrain.engine import train

    out = tmp_path_factory.mktemp("pretrained") / "run"
    more = ("optim.max_steps=2", "optim.warmup_steps=1", "run.eval_every=0")
    cfg = load_config(str(TINY), tiny_overrides(domains["source"], out, *more))
    with pytest.MonkeyPatch.context() as mp:
        lone_env(mp)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train(cfg)
        finally:
            shutdown()
            torch.set_num_threads(threads)
    return out / "model"
