"""Validation during training: the quick validation, MISSRec's interest refresh, and the model they evaluate.

The quick validation is :func:`pretrain.ranking.evaluate_domain` (the project's one ranking implementation) on
the valid split of each validation domain, full ranking only: up to ``run.eval_users`` users per domain (the
first ones in a seeded order of the sequence shards; 0: all), each ranked against the domain's whole catalog with
the user's earlier items masked and ties broken by a fixed random order; HR@10 and NDCG@10 next to the popularity
ranker's. Every rank encodes its share of the catalog and ranks its share of the users; the sums are all-reduced,
so every rank returns the same metrics. ``python -m pretrain.evaluate --split valid`` on the same users gives the
same numbers (under ``valid/full/...``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from shards.subset import catalog_id

from .catalog import cat_embeddings, encode_catalog, valid_folders
from .config import TrainConfig
from .export import ModelFactory, gathered_state_dict, new_model
from .metrics import Tally
from .model import Recommender
from .ranking import EvalOptions, evaluate_domain

K = 10
"""The cut-off of the quick validation's metrics."""


@contextlib.contextmanager
def evaluation_model(engine: Any, cfg: TrainConfig, factory: ModelFactory = new_model) -> Iterator[Recommender]:
    """The engine's model in eval mode; under ZeRO-3 a full copy (every rank), since methods other than
    ``forward`` (encode_items, score) would meet partitioned parameters: ``factory`` builds it (the engine's model
    factory, so that e.g. finetuning's LoRA layers are there) and the gathered weights are loaded into it."""
    module: Recommender = engine.module
    if engine.zero_optimization_stage() == 3:
        state = gathered_state_dict(engine, to_rank0_only=False)
        with torch.random.fork_rng(devices=[]):  # the copy's initialisation is overwritten: keep the RNG as is
            copy = factory(cfg, module.catalog)
        copy.load_state_dict(state)
        yield copy.to(engine.device).eval()
        return
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def refresh_interests(
    engine: Any, cfg: TrainConfig, train_folders: Sequence[str], dist: Any, factory: ModelFactory = new_model
) -> None:
    """MISSRec: recompute the interest prototypes over the training domains' catalogs (rank 0's result is
    broadcast, so every rank's buffers are identical). ``factory``: as :func:`evaluation_model`'s."""
    with evaluation_model(engine, cfg, factory) as model, torch.no_grad():
        parts = [encode_catalog(model, f, d, cfg.data.stream) for d, f in enumerate(train_folders)]
        engine.module.refresh_interests(cat_embeddings(parts))
    for buffer in (engine.module.interests, engine.module.prototype_of):
        torch.distributed.broadcast(buffer, src=0)


def quick_validation(
    engine: Any, cfg: TrainConfig, catalog_folders: Sequence[str], dist: Any, factory: ModelFactory = new_model
) -> dict[str, float]:
    """``valid/hr@10``, ``valid/ndcg@10``, ``valid/pop_hr@10``, ``valid/pop_ndcg@10`` and ``valid/users`` over
    every validation domain's users (and ``valid/<folder name>/...`` per domain when there are several); the same
    on every rank. ``catalog_folders``: the model's domains in catalog order; ``dist`` is not needed (the
    reductions use torch.distributed's default group) and kept for the engine's call; ``factory``: as
    :func:`evaluation_model`'s."""
    position = {catalog_id(f): d for d, f in enumerate(catalog_folders)}
    folders = valid_folders(cfg)
    # a damaged validation shard must not end the training: a partial validation is logged loudly (PARTIAL RESULT)
    opts = EvalOptions(splits=("valid",), users=cfg.run.eval_users, batch_size=cfg.data.stream.batch_size,
                       allow_partial=True)  # fmt: skip
    with evaluation_model(engine, cfg, factory) as model:
        tallies = [
            evaluate_domain(model, f, position[catalog_id(f)], cfg.data.stream, opts).tallies["valid"] for f in folders
        ]
    metrics = _metrics("valid", sum(tallies[1:], tallies[0]))
    if len(folders) > 1:
        for folder, tally in zip(folders, tallies):
            metrics.update(_metrics(f"valid/{Path(folder).name}", tally))
    return metrics


def _metrics(prefix: str, tally: Tally) -> dict[str, float]:
    users = float(tally.users[0])
    names = {
        "hr": ("full", "hr"),
        "ndcg": ("full", "ndcg"),
        "pop_hr": ("full/pop", "hr"),
        "pop_ndcg": ("full/pop", "ndcg"),
    }
    # no user at all: 0, not NaN
    metrics = {f"{prefix}/{name}@{K}": tally.mean(*what, K) if users else 0.0 for name, what in names.items()}
    return {**metrics, f"{prefix}/users": users}
