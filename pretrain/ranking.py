"""Leave-one-out ranking over a domain's whole catalog (the command: ``python -m pretrain.evaluate``).

The project's one ranking implementation: this command and the engine's quick validation
(:func:`pretrain.validate.quick_validation`) both run :func:`evaluate_domain`; the rank rule, the metrics and the
buckets are defined in :mod:`pretrain.metrics`, the encoded catalog in :mod:`pretrain.catalog`, the held-out users
in :mod:`pretrain.heldout`.

Per domain and split (``valid``: history seq[:-2], target seq[-2]; ``test``: history seq[:-1], target seq[-1]):

- The whole catalog is encoded once, ``encode_chunk`` items per call, from the domain's ``items-*.tar`` shards;
  with a process group every rank encodes its share of the chunks and the rows are all-gathered.
- Each user's history (its last ``data.stream.max_seq_len`` items, as in training) gives the user vector, over
  the encoded catalog's rows: users and candidates see the same item embeddings, and no image is decoded twice.
- **full**: the target against every catalog item but the user's earlier items (all of them, not only the
  truncated history), scored through ``model.score`` (score fusion fuses per modality), ``chunk`` items at a time.
  Scores are computed in float64 and rounded to float32, so an item gets the same score whatever the block shapes:
  identical items tie exactly, and the metrics do not depend on ``chunk``, the batch size or the number of ranks.
- **sampled<N>** (``--sampled N``): the target against N items drawn uniformly without replacement from those the
  user never met (seeded per user and split; fewer when the catalog has fewer), same tie rule.
- **pop**: the popularity ranker (training interactions per item, the manifest's ``popularity``) under the same
  protocol, masks and tie order: the floor a model must beat.

Metric names: ``<split>/<protocol>[/pop]/<metric>@<k>[/<bucket>]``, e.g. ``test/full/ndcg@10``,
``test/full/pop/hr@20/tail``, ``test/sampled100/mrr@10``, and ``<split>/users[/<bucket>]``. The command writes them
with the bucket definitions to ``EXPORT/eval-<domain>.json`` (or ``--out``), to TensorBoard (``--tb DIR``: one run
per domain, ``DIR/<domain>``), and prints a table.

A domain not in the model's catalog (a new target domain) is ranked by content: the model is rebuilt with the
domain appended to its catalog (a domain index only selects ID-embedding, popularity and interest rows and keys the
frozen-encoder cache, so reusing another domain's index would be wrong), which needs a model without item-ID
embeddings; with them the command says to finetune first. The new items get no MISSRec interest (no interest
memory), as the engine's validation-only domains.

Shape legend::

    B users of a batch    C catalog items of the domain    U rows of an item table    D model width
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shards import schema
from shards.errors import InputError
from shards.progress import bar
from shards.stream_config import Split, StreamConfig

from . import distributed
from .catalog import ENCODE_CHUNK, EncodedCatalog, encode_catalog_content, map_fields, select
from .config import TrainConfig
from .export import new_model
from .heldout import HeldOut, held_out_users, padded, user_batch
from .metrics import (
    SCORE_CHUNK,
    Tally,
    item_buckets,
    rank_targets,
    sample_negatives,
    tiebreak_order,
)
from .model import Catalog, ItemEmbeddings, Recommender

log = logging.getLogger(__name__)

SPLIT_CHOICES = {"valid": ("valid",), "test": ("test",), "both": ("valid", "test")}


# ---- scores -------------------------------------------------------------------------------------------------


def _double(x: torch.Tensor) -> torch.Tensor:
    return x.double() if x.is_floating_point() else x


def _model_scores(
    model: Recommender, user_BD: torch.Tensor, catalog: ItemEmbeddings, rows: torch.Tensor | slice
) -> torch.Tensor:
    # float64, then rounded to float32: the same value for an item whatever the block shapes
    return model.score(user_BD, map_fields(select(catalog, rows), _double)).float()


def _pop_scores(popularity_C: torch.Tensor, users: int, rows: torch.Tensor | slice) -> torch.Tensor:
    return popularity_C[rows].expand(users, -1)


# ---- one domain ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalOptions:
    splits: tuple[Split, ...] = ("valid", "test")
    users: int = 0
    """Users per split (0: all): the first ones in a seeded order of the sequence shards."""
    batch_size: int = 64
    """Users scored together (per rank)."""
    chunk: int = SCORE_CHUNK
    """Catalog items scored per block."""
    encode_chunk: int = ENCODE_CHUNK
    """Catalog items encoded per call."""
    sampled: int = 0
    """Negatives per user of the sampled protocol (0: full ranking only)."""
    seed: int = 0
    """Seeds the tie order, the sampled negatives and the choice of users."""
    head_share: float = 0.2
    """Share of the catalog's items that are the popularity head."""
    allow_partial: bool = False
    """Return a result over fewer users than the manifest promises (bad samples, a shard cut short), with a warning
    and the count, instead of raising :class:`InputError`."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "chunk", "encode_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("users", "sampled", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.head_share < 1:
            raise ValueError(f"head_share must be in (0, 1), got {self.head_share}")

    @property
    def rankings(self) -> tuple[str, ...]:
        protocols = ["full"] + ([f"sampled{self.sampled}"] if self.sampled else [])
        return tuple(r for p in protocols for r in (p, f"{p}/pop"))


@dataclass
class DomainResult:
    domain: str
    """The manifest's domain name."""
    folder: str
    n_items: int
    tallies: dict[str, Tally]
    """Per split, summed over the ranks."""
    buckets: dict[str, dict[str, Any]]
    bad_samples: int = 0
    users_expected: int = 0
    """Users the manifest promises (all of them, or EvalOptions.users); a partial result ranked fewer."""

    def metrics(self) -> dict[str, float]:
        return {name: v for split, tally in self.tallies.items() for name, v in tally.metrics(split).items()}


@dataclass
class _Ranker:
    """What ranking a domain's users needs, on the model's device."""

    model: Recommender
    catalog: EncodedCatalog
    popularity_C: torch.Tensor
    tiebreak_C: torch.Tensor
    member_CQ: torch.Tensor
    domain: str
    opts: EvalOptions

    def add(self, tally: Tally, split: Split, users: Sequence[HeldOut]) -> None:
        device = self.popularity_C.device
        batch = user_batch(users, device)
        n_items, B = len(self.popularity_C), len(batch)
        if int(batch.seen.max()) >= n_items or int(batch.target_item.max()) >= n_items:
            raise InputError(f"domain {self.domain!r}: a sequence names an item beyond the catalog's {n_items}")
        emb = self.catalog.items
        user_BD = self.model.user_vectors(batch, select(emb, batch.item_rows)).double()
        negatives_BN = self._negatives(split, users, device)
        member_BQ = self.member_CQ[batch.target_item.cpu()]
        tally.count(member_BQ)
        scorers = {"": functools.partial(_model_scores, self.model, user_BD, emb),
                   "/pop": functools.partial(_pop_scores, self.popularity_C, B)}  # fmt: skip
        for suffix, score in scorers.items():
            full_B, sampled_B = rank_targets(score, n_items, batch.target_item, batch.seen, self.tiebreak_C,
                                             self.opts.chunk, negatives_BN)  # fmt: skip
            tally.add(f"full{suffix}", full_B, member_BQ, None if suffix else batch.user_index)
            if sampled_B is not None:
                tally.add(f"sampled{self.opts.sampled}{suffix}", sampled_B, member_BQ)

    def _negatives(self, split: Split, users: Sequence[HeldOut], device: torch.device) -> torch.Tensor | None:
        if not self.opts.sampled:
            return None
        key = [self.opts.seed, zlib.crc32(self.domain.encode()), ("valid", "test").index(split)]
        n_items = len(self.popularity_C)
        drawn = [sample_negatives(n_items, self.opts.sampled, [*u.seen, u.target], [*key, u.user]) for u in users]
        return padded([d.tolist() for d in drawn], -1, torch.long).to(device)


@torch.no_grad()
def evaluate_domain(
    model: Recommender, folder: str | Path, domain: int, stream_cfg: StreamConfig, opts: EvalOptions
) -> DomainResult:
    """Rank every (or ``opts.users``) held-out user of ``folder`` against its whole catalog (model domain
    ``domain``); with a process group every rank takes its share of users and catalog chunks and every rank
    must call it. Returns the sums over all ranks."""
    manifest = schema.load_manifest(folder)
    if model.catalog.n_items[domain] != manifest.n_items:
        raise InputError(
            f"{folder}: {manifest.n_items} items, but the model's domain {domain} "
            f"({model.catalog.domains[domain]!r}) has {model.catalog.n_items[domain]}: built differently"
        )
    device = next(model.parameters()).device
    catalog = encode_catalog_content(model, folder, domain, stream_cfg, opts.encode_chunk)
    member_CQ, buckets = item_buckets(manifest.popularity, catalog.modality_C, opts.head_share)
    ranker = _Ranker(
        model,
        catalog,
        torch.tensor(manifest.popularity, dtype=torch.float64, device=device),
        tiebreak_order(manifest.n_items, manifest.domain, opts.seed).to(device),
        member_CQ,
        manifest.domain,
        opts,
    )
    rank, world = distributed.ranks()
    counts: Counter = Counter()
    tallies = {}
    expected = manifest.n_users if not opts.users else min(opts.users, manifest.n_users)
    for split in opts.splits:
        tally = Tally(opts.rankings)
        counted = counts if split == opts.splits[0] else None  # every split reads the same samples
        users = held_out_users(folder, split, stream_cfg.max_seq_len, opts.users, opts.seed, rank, world, counted)
        share = -(-expected // world)  # rank 0's: users are dealt round-robin from it
        with bar(total=share, enabled=rank == 0, desc=f"ranking {manifest.domain} {split}", unit="user") as progress:
            for group in _batched(users, opts.batch_size):
                ranker.add(tally, split, group)
                progress.update(len(group))
        tally.all_reduce(device)
        tallies[split] = tally
    # every rank reads every sample: its counts are the domain's
    _check_users(folder, {split: int(t.users[0]) for split, t in tallies.items()}, expected, counts, opts)
    return DomainResult(manifest.domain, str(folder), manifest.n_items, tallies, buckets, counts["bad_samples"],
                        expected)  # fmt: skip


def _check_users(folder: str | Path, ranked: dict[str, int], expected: int, counts: Counter, opts: EvalOptions) -> None:
    """An :class:`InputError` (a warning with ``opts.allow_partial``) when a split ranked fewer users than the
    manifest promises: a metric over the users that happened to be readable is not the domain's."""
    short = {split: n for split, n in ranked.items() if n < expected}
    if not short:
        return
    found = ", ".join(f"{split} {n}" for split, n in short.items())
    message = (f"{folder}: ranked {found} of the {expected} users the manifest promises ({counts['bad_samples']} bad "
               f"samples, {counts['missing_samples']} samples missing from shards cut short, "
               f"{counts['tar_errors']} unreadable tar parts): run `python -m shards verify {folder}`")  # fmt: skip
    if not opts.allow_partial:
        raise InputError(message + "; or accept a partial result (--allow-partial)")
    log.warning("PARTIAL RESULT: %s", message)


def _batched(items: Iterable[HeldOut], size: int) -> Iterator[list[HeldOut]]:
    group: list[HeldOut] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


# ---- a domain the model has not seen -------------------------------------------------------------------------


def model_for_domain(model: Recommender, cfg: TrainConfig, manifest: schema.Manifest) -> tuple[Recommender, int]:
    """(the model, the domain index) for ``manifest``'s domain: its index in the model's catalog, or, for a new
    domain, a copy of the model whose catalog has that domain appended (ranked by content alone)."""
    catalog = model.catalog
    if manifest.domain in catalog.domains:
        return model, catalog.domains.index(manifest.domain)
    if model.ids is not None:
        raise ValueError(
            f"domain {manifest.domain!r} is not in the model's catalog {list(catalog.domains)}, and the model uses "
            "item-ID embeddings (model.user.id_embeddings), which have no rows for it: finetune on that domain first"
        )
    grown = Catalog(
        (*catalog.domains, manifest.domain),
        (*catalog.n_items, manifest.n_items),
        (*catalog.popularity, tuple(manifest.popularity)),
    )
    copy = new_model(cfg, grown)
    state = model.state_dict()
    # new items have no interest prototype (-1): as the engine's validation-only domains, no interest memory
    state["prototype_of"] = torch.cat([state["prototype_of"], state["prototype_of"].new_full((manifest.n_items,), -1)])
    copy.load_state_dict(state)
    device = next(model.parameters()).device
    return copy.to(device).eval(), len(catalog.domains)
