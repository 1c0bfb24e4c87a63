"""Quick validation during pretraining, and the catalog encodings it shares with MISSRec's interest refresh.

For each validation domain: encode its whole catalog in chunks (``items-*.tar`` -> :func:`shards.collate.
collate_items` -> ``encode_items``), take up to ``run.eval_users`` users of its valid split (history seq[:-2],
target seq[-2]; shards in a fixed seeded order, no sample shuffle), score each user against the catalog, mask the
user's history items (not the target), and rank the target: HR@10 and NDCG@10, next to a popularity ranker's
(the manifest's training popularity), the floor a model must beat. Every rank takes its share of the users
(the valid stream splits them) and encodes the whole catalog; the sums are all-reduced. Ties are broken by a
fixed random order of the catalog, for the model and the popularity ranker alike, so a collapsed model (all
scores equal) scores like a random ranker, not a perfect one.

Shape legend::

    B users of a batch    C catalog items of one domain    U rows of an item table    D model width
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from shards import schema
from shards.collate import Batch, ItemTable, collate_items
from shards.inspect import read_shard
from shards.stream import SequenceStream, StreamConfig

from .config import TrainConfig
from .model import ItemEmbeddings, Recommender

CHUNK = 256
"""Catalog items encoded per call."""
K = 10


# ---- catalog encoding -----------------------------------------------------------------------------


def catalog_tables(folder: str | Path, domain: int, cfg: StreamConfig, chunk: int = CHUNK) -> Iterator[ItemTable]:
    """The catalog of ``folder`` (its items shards, in order) as item tables of ``chunk`` items of ``domain``."""
    manifest = schema.load_manifest(folder)
    pending: list[tuple[int, schema.Item]] = []
    for info in manifest.item_shards:
        for raw in read_shard(Path(folder) / info.name):
            pending.append((domain, schema.decode_item(raw)))
            if len(pending) == chunk:
                yield collate_items(pending, cfg)
                pending = []
    if pending:
        yield collate_items(pending, cfg)


def _map_fields(emb: ItemEmbeddings, fn: Any, *args: Any) -> ItemEmbeddings:
    """``fn(tensor, *args)`` on every tensor field (None stays None)."""
    fields = {f.name: getattr(emb, f.name) for f in dataclasses.fields(emb)}
    return ItemEmbeddings(**{name: None if x is None else fn(x, *args) for name, x in fields.items()})


def _index(x: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    return x[rows]


def _detached(x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    return x.float() if x.is_floating_point() else x  # bf16 scores would tie far more often


def cat_embeddings(parts: Sequence[ItemEmbeddings]) -> ItemEmbeddings:
    """Row-wise concatenation of encoded chunks."""
    names = [f.name for f in dataclasses.fields(ItemEmbeddings)]
    joined = {n: None if getattr(parts[0], n) is None else torch.cat([getattr(p, n) for p in parts]) for n in names}
    return ItemEmbeddings(**joined)


def select(emb: ItemEmbeddings, rows: torch.Tensor | slice) -> ItemEmbeddings:
    """The rows ``rows`` of every field."""
    return _map_fields(emb, _index, rows)


@torch.no_grad()
def encode_catalog(model: Recommender, folder: str | Path, domain: int, cfg: StreamConfig) -> ItemEmbeddings:
    """The embeddings of the whole catalog of ``folder`` (model domain ``domain``), row c = catalog index c, fp32."""
    device = next(model.parameters()).device
    parts = [_map_fields(model.encode_items(t.to(device)), _detached) for t in catalog_tables(folder, domain, cfg)]
    emb = cat_embeddings(parts)
    index_C = emb.rows_U - model.domain_offset[domain]
    n_items = model.catalog.n_items[domain]
    if sorted(index_C.tolist()) != list(range(n_items)):
        raise ValueError(f"{folder}: the items shards do not hold exactly the {n_items} catalog items")
    return select(emb, index_C.argsort())


# ---- the model to evaluate -----------------------------------------------------------------------------


@contextlib.contextmanager
def evaluation_model(engine: Any, cfg: TrainConfig) -> Iterator[Recommender]:
    """The engine's model in eval mode; under ZeRO-3 a full copy built from the gathered weights (every rank),
    since methods other than ``forward`` (encode_items, score) would meet partitioned parameters."""
    module: Recommender = engine.module
    if engine.zero_optimization_stage() == 3:
        from .checkpoint import gathered_state_dict

        state = gathered_state_dict(engine, to_rank0_only=False)
        copy = Recommender(cfg.model, cfg.loss, module.catalog, image_size=cfg.data.stream.image_size)
        copy.load_state_dict(state)
        yield copy.to(engine.device).eval()
        return
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def refresh_interests(engine: Any, cfg: TrainConfig, train_folders: Sequence[str], dist: Any) -> None:
    """MISSRec: recompute the interest prototypes over the training domains' catalogs (rank 0's result is
    broadcast, so every rank's buffers are identical)."""
    stream_cfg = _eval_stream_cfg(cfg.data.stream)
    with evaluation_model(engine, cfg) as model, torch.no_grad():
        emb = cat_embeddings([encode_catalog(model, f, d, stream_cfg) for d, f in enumerate(train_folders)])
        engine.module.refresh_interests(emb)
    for buffer in (engine.module.interests, engine.module.prototype_of):
        torch.distributed.broadcast(buffer, src=0)


# ---- ranking ----------------------------------------------------------------------------------------------


def target_ranks(
    scores_BC: torch.Tensor, target_B: torch.Tensor, drop_BC: torch.Tensor, tiebreak_C: torch.Tensor
) -> torch.Tensor:
    """(B,) 0-based rank of each target among the catalog items not dropped: the items scoring higher, plus the
    items scoring the same that come first in ``tiebreak_C`` order."""
    scores_BC = scores_BC.masked_fill(drop_BC, -math.inf)
    t_B1 = scores_BC.gather(1, target_B[:, None])
    tie_B1 = tiebreak_C[target_B][:, None]
    above_BC = (scores_BC > t_B1) | ((scores_BC == t_B1) & (tiebreak_C[None, :] < tie_B1))
    return above_BC.sum(1)


def history_mask(batch: Batch, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(target_B catalog indices, (B, C) True at the user's history items other than the target)."""
    target_B = batch.item_index[batch.target]
    history_BL = torch.where(batch.seq_mask, batch.item_index[batch.seq.clamp_min(0)], target_B[:, None])
    drop_BC = torch.zeros(len(batch), n_items, dtype=torch.bool, device=target_B.device)
    drop_BC.scatter_(1, history_BL, True)
    drop_BC[torch.arange(len(batch), device=target_B.device), target_B] = False
    return target_B, drop_BC


def _hits(rank_B: torch.Tensor) -> tuple[float, float]:
    """(HR@K, NDCG@K) summed over the users."""
    inside_B = rank_B < K
    ndcg_B = torch.where(inside_B, 1 / torch.log2(rank_B.double() + 2), 0.0)
    return float(inside_B.sum()), float(ndcg_B.sum())


@torch.no_grad()
def _score_batch(model: Recommender, batch: Batch, catalog: ItemEmbeddings) -> torch.Tensor:
    user_BD = model.user_vectors(batch).float()
    C = catalog.rows_U.shape[0]
    step = max(1, 2**22 // max(1, len(batch) * user_BD.shape[1]))  # bounded (B, chunk) blocks
    return torch.cat([model.score(user_BD, select(catalog, slice(s, s + step))) for s in range(0, C, step)], dim=1)


def _eval_stream_cfg(cfg: StreamConfig) -> StreamConfig:
    return dataclasses.replace(
        cfg, split="valid", resampled=False, shuffle_buffer=0, shuffle_shards=True, augment=False, num_workers=0
    )


def _domain_sums(model: Recommender, cfg: TrainConfig, folder: str, domain: int, world_size: int) -> list[float]:
    """[users, hr, ndcg, pop_hr, pop_ndcg] summed over this rank's share of the domain's eval users."""
    stream_cfg = _eval_stream_cfg(cfg.data.stream)
    catalog = encode_catalog(model, folder, domain, stream_cfg)
    device = catalog.rows_U.device
    n_items = catalog.rows_U.shape[0]
    popularity_C = torch.tensor(model.catalog.popularity[domain], dtype=torch.float32, device=device)
    tiebreak_C = torch.randperm(n_items, generator=torch.Generator().manual_seed(domain)).to(device)
    stream = SequenceStream([folder], stream_cfg)
    n_batches = len(stream)
    if cfg.run.eval_users:
        n_batches = min(n_batches, math.ceil(cfg.run.eval_users / (stream_cfg.batch_size * world_size)))
    sums = [0.0] * 5
    for batch, _ in zip(stream, range(n_batches)):
        batch = batch.to(device)
        batch = dataclasses.replace(
            batch,
            item_domain=torch.full_like(batch.item_domain, domain),
            user_domain=torch.full_like(batch.user_domain, domain),
        )
        target_B, drop_BC = history_mask(batch, n_items)
        model_rank_B = target_ranks(_score_batch(model, batch, catalog), target_B, drop_BC, tiebreak_C)
        pop_rank_B = target_ranks(popularity_C.expand(len(batch), -1), target_B, drop_BC, tiebreak_C)
        sums = [a + b for a, b in zip(sums, [len(batch), *_hits(model_rank_B), *_hits(pop_rank_B)])]
    return sums


def valid_folders(cfg: TrainConfig) -> list[str]:
    return list(cfg.data.domains if cfg.data.valid_domains is None else cfg.data.valid_domains)


def quick_validation(engine: Any, cfg: TrainConfig, catalog_folders: Sequence[str], dist: Any) -> dict[str, float]:
    """``valid/hr@10``, ``valid/ndcg@10``, ``valid/pop_hr@10``, ``valid/pop_ndcg@10`` over every validation
    domain's users (and ``valid/<domain>/...`` per domain when there are several); the same on every rank."""
    position = {Path(f).resolve(): d for d, f in enumerate(catalog_folders)}
    folders = valid_folders(cfg)
    with evaluation_model(engine, cfg) as model:
        local = [s for f in folders for s in _domain_sums(model, cfg, f, position[Path(f).resolve()], dist.world_size)]
    summed = torch.tensor(local, dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(summed)
    per_domain = summed.view(len(folders), 5)
    metrics = _metrics("valid", per_domain.sum(0).tolist())
    if len(folders) > 1:
        for folder, row in zip(folders, per_domain.tolist()):
            metrics.update(_metrics(f"valid/{Path(folder).name}", row))
    return metrics


def _metrics(prefix: str, sums: list[float]) -> dict[str, float]:
    users = max(sums[0], 1.0)
    return {
        f"{prefix}/hr@{K}": sums[1] / users,
        f"{prefix}/ndcg@{K}": sums[2] / users,
        f"{prefix}/pop_hr@{K}": sums[3] / users,
        f"{prefix}/pop_ndcg@{K}": sums[4] / users,
        f"{prefix}/users": sums[0],
    }
