"""Leave-one-out ranking over a domain's whole catalog (the command: ``python -m pretrain.evaluate``).

The project's one ranking implementation: this command and the engine's quick validation
(:func:`pretrain.validate.quick_validation`) both run :func:`evaluate_domain`; the rank rule, the metrics and the
buckets are defined in :mod:`pretrain.metrics`.

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

import dataclasses
import functools
import logging
import math
import random
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shards import schema
from shards.collate import ItemTable, Split, collate_items, split_example, warn_once
from shards.errors import InputError
from shards.inspect import read_shard
from shards.progress import bar
from shards.stream import StreamConfig, TarErrors

from .config import TrainConfig
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

ENCODE_CHUNK = 256
"""Catalog items encoded per call."""
SPLIT_CHOICES = {"valid": ("valid",), "test": ("test",), "both": ("valid", "test")}


def ranks() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ---- item embeddings ------------------------------------------------------------------------------------------


def _map_fields(emb: ItemEmbeddings, fn: Callable[..., torch.Tensor], *args: Any) -> ItemEmbeddings:
    """``fn(tensor, *args)`` on every tensor field (None stays None)."""
    fields = {f.name: getattr(emb, f.name) for f in dataclasses.fields(emb)}
    return ItemEmbeddings(**{name: None if x is None else fn(x, *args) for name, x in fields.items()})


def _index(x: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    return x[rows]


def _double(x: torch.Tensor) -> torch.Tensor:
    return x.double() if x.is_floating_point() else x


def select(emb: ItemEmbeddings, rows: torch.Tensor | slice) -> ItemEmbeddings:
    """The rows ``rows`` of every field."""
    return _map_fields(emb, _index, rows)


def cat_embeddings(parts: Sequence[ItemEmbeddings]) -> ItemEmbeddings:
    """Row-wise concatenation of encoded chunks."""
    names = [f.name for f in dataclasses.fields(ItemEmbeddings)]
    joined = {n: None if getattr(parts[0], n) is None else torch.cat([getattr(p, n) for p in parts]) for n in names}
    return ItemEmbeddings(**joined)


# ---- the catalog ---------------------------------------------------------------------------------------------


def catalog_tables(
    folder: str | Path, domain: int, cfg: StreamConfig, chunk: int = ENCODE_CHUNK, rank: int = 0, world: int = 1
) -> Iterator[ItemTable]:
    """The catalog of ``folder`` (its items shards, in order) as item tables of ``chunk`` items of ``domain``;
    only the chunks numbered ``rank`` mod ``world`` are collated. Every rank decodes every item, so that a bad one
    stops all ranks alike (one rank stopping alone would leave the others waiting in a collective)."""
    manifest = schema.load_manifest(folder)
    pending: list[tuple[int, schema.Item]] = []
    number = 0
    for info in manifest.item_shards:
        for raw in _catalog_samples(Path(folder), info):
            pending.append((domain, _catalog_item(raw, manifest.n_items)))
            if len(pending) == chunk:
                if number % world == rank:
                    yield collate_items(pending, cfg)
                pending, number = [], number + 1
    if pending and number % world == rank:
        yield collate_items(pending, cfg)


def _catalog_item(raw: dict[str, Any], n_items: int) -> schema.Item:
    """The item of an items-shard sample; one that breaks the schema (or has an index outside the catalog) is an
    :class:`InputError`: a catalog with an item left out cannot be ranked against."""
    try:
        return schema.decode_item(raw, n_items=n_items)
    except schema.SampleError as e:
        hint = f"the catalog is incomplete (run `python -m shards verify {Path(e.shard).parent}`)"
        raise InputError(f"{e}: {hint}") from None


def _catalog_samples(folder: Path, info: schema.ShardInfo) -> Iterator[dict[str, Any]]:
    """The raw samples of one items shard; a missing, truncated or corrupt shard is an :class:`InputError` naming
    it (a catalog with items left out cannot be ranked against)."""
    path = folder / info.name
    if not path.is_file():
        raise InputError(f"{path}: listed in the manifest but missing")
    hint = f"the catalog is incomplete (run `python -m shards verify {folder}`)"
    count = 0
    try:
        for raw in read_shard(path):
            count += 1
            yield raw
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:  # tarfile's ReadError for a truncated shard
        problem = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        raise InputError(f"{path}: unreadable tar content after {count} samples ({problem}): {hint}") from None
    if count != info.samples:
        raise InputError(f"{path}: {count} samples, the manifest says {info.samples}: {hint}")


@dataclass
class EncodedCatalog:
    """A domain's whole catalog, row c = catalog index c."""

    items: ItemEmbeddings
    """As ``encode_items`` returns them (in the model's dtype, detached)."""
    modality_C: torch.Tensor
    """(C,) long: the item's content as stored, an index into MODALITY_BUCKETS."""


def _gather_rows(
    local: dict[str, torch.Tensor | None] | None, device: torch.device
) -> dict[str, torch.Tensor | None] | None:
    """Every rank's rows of each field, concatenated in rank order (all_gather needs equal shapes: each rank's
    rows are padded to the largest count). ``local`` is None on a rank that encoded nothing; None if none did."""
    world = ranks()[1]
    if world == 1:
        return local
    spec = None if local is None else {k: None if v is None else (v.shape[1:], v.dtype) for k, v in local.items()}
    specs: list[Any] = [None] * world
    torch.distributed.all_gather_object(specs, spec)  # the field shapes, for the ranks that encoded nothing
    spec = next((s for s in specs if s is not None), None)
    if spec is None:
        return None
    count = torch.tensor([0 if local is None else len(local["rows_U"])], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    out: dict[str, torch.Tensor | None] = {}
    for name, s in spec.items():
        if s is None:
            out[name] = None
            continue
        shape, dtype = s
        x = torch.empty((0, *shape), dtype=dtype, device=device) if local is None else local[name]
        x = torch.cat([x, x.new_zeros((max(sizes) - x.shape[0], *shape))])
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x)
        out[name] = torch.cat([p[:n] for p, n in zip(parts, sizes)])
    return out


@torch.no_grad()
def encode_catalog_content(
    model: Recommender, folder: str | Path, domain: int, cfg: StreamConfig, chunk: int = ENCODE_CHUNK
) -> EncodedCatalog:
    """The whole catalog of ``folder`` (model domain ``domain``) encoded, with each item's stored modalities.
    With a process group, every rank encodes its share of the chunks and receives all rows (every rank must call
    it). Frozen-bottom outputs come from and go to the disk store (model.feature_cache_dir) when the model caches
    them; rank 0 shows a progress bar and logs how many items the cache held."""
    rank, world = ranks()
    device = next(model.parameters()).device
    model.bind_items(domain, folder, cfg)
    before = model.feature_cache_stats()
    share = _share(model.catalog.n_items[domain], chunk, rank, world)
    parts = []
    with bar(total=share, enabled=rank == 0, desc=f"encoding {Path(folder).name}", unit="item") as progress:
        for table in catalog_tables(folder, domain, cfg, chunk, rank, world):
            emb = model.encode_items(table.to(device))
            fields = {f.name: getattr(emb, f.name) for f in dataclasses.fields(emb)}
            fields = {k: None if v is None else v.detach() for k, v in fields.items()}
            parts.append({**fields, "data_text": table.has_text.to(device), "data_image": table.has_image.to(device)})
            progress.update(len(table.item_index))
    model.flush_feature_cache()
    if rank == 0:
        _log_cache_use(folder, before, model.feature_cache_stats())
    local = (
        None if not parts else {k: None if v is None else torch.cat([p[k] for p in parts]) for k, v in parts[0].items()}
    )
    rows = _gather_rows(local, device)
    if rows is None:
        raise InputError(f"{folder}: the items shards hold no item")
    data_text, data_image = rows.pop("data_text"), rows.pop("data_image")
    emb = ItemEmbeddings(**rows)
    index_C = emb.rows_U - model.domain_offset[domain]
    n_items = model.catalog.n_items[domain]
    if sorted(index_C.tolist()) != list(range(n_items)):
        raise InputError(f"{folder}: the items shards do not hold exactly the {n_items} catalog items")
    order = index_C.argsort()
    code = torch.where(data_text, torch.where(data_image, 0, 1), torch.where(data_image, 2, 3))
    return EncodedCatalog(select(emb, order), code[order])


def _share(n_items: int, chunk: int, rank: int, world: int) -> int:
    """Items in the chunks of ``rank`` (chunk number ``k`` goes to rank ``k mod world``)."""
    return sum(min(chunk, n_items - start) for k, start in enumerate(range(0, n_items, chunk)) if k % world == rank)


def _log_cache_use(folder: str | Path, before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> None:
    """How this rank's frozen-bottom outputs of a catalog were obtained, per tower; nothing without a cache or when
    they were all in memory already (a validation during training)."""
    used = []
    for tower, now in after.items():
        delta = {k: v - before.get(tower, {}).get(k, 0) for k, v in now.items()}
        if not delta["disk"] and not delta["computed"]:
            continue
        used.append(f"{tower}: {delta['disk']} from the disk cache, {delta['memory']} from memory, "
                    f"{delta['computed']} computed")  # fmt: skip
    if used:
        log.info("catalog of %s, frozen encoder outputs (rank 0): %s", folder, "; ".join(used))


def encode_catalog(
    model: Recommender, folder: str | Path, domain: int, cfg: StreamConfig, chunk: int = ENCODE_CHUNK
) -> ItemEmbeddings:
    """The embeddings of the whole catalog of ``folder``, row c = catalog index c (see encode_catalog_content)."""
    return encode_catalog_content(model, folder, domain, cfg, chunk).items


# ---- held-out users ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOut:
    """One user of a split, in catalog indices."""

    user: int
    history: tuple[int, ...]
    """What the model reads: the most recent ``max_seq_len`` items before the target."""
    timestamps: tuple[float, ...] | None
    seen: tuple[int, ...]
    """Every item before the target (masked in the ranking)."""
    target: int


def held_out_users(
    folder: str | Path,
    split: Split,
    max_seq_len: int,
    users: int = 0,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    counts: Counter | None = None,
) -> Iterator[HeldOut]:
    """The users of ``folder``'s split, every ``world``-th from the ``rank``-th: all of them in shard order, or,
    with ``users`` > 0, the first ``users`` in a seeded order of the shards. Samples that break the schema are
    skipped (counted in ``counts['bad_samples']``, logged once), and so is unreadable tar content (a truncated
    shard: ``counts['tar_errors']``)."""
    counts = Counter() if counts is None else counts
    manifest = schema.load_manifest(folder)
    shards = list(manifest.seq_shards)
    if users:
        random.Random(f"momrec-eval-users:{seed}").shuffle(shards)
    taken = 0
    for info in shards:
        path = Path(folder) / info.name
        if not path.is_file():
            raise InputError(f"{path}: listed in the manifest but missing")
        read = 0
        # only item indices are held out: the item images are passed over unextracted
        for raw in read_shard(path, TarErrors([str(path)], counts), lambda name: not schema.is_image_member(name)):
            read += 1
            try:
                seq = schema.decode_seq(raw, images=False, n_items=manifest.n_items, n_users=manifest.n_users)
            except schema.SampleError as e:
                counts["bad_samples"] += 1
                warn_once(log, ("eval-sample", e.shard, e.key), "skipping bad sample: %s", e)
                continue
            if taken % world == rank:
                yield _held_out(seq, split, max_seq_len)
            taken += 1
            if taken == users:
                return
        if read < info.samples:  # tar reads a damaged header as the end of the archive: no error, fewer samples
            counts["missing_samples"] += info.samples - read
            warn_once(log, ("eval-short", str(path)), "%s: %d of the %d samples the manifest lists were read",
                      path, read, info.samples)  # fmt: skip


def _held_out(seq: schema.Sequence, split: Split, max_seq_len: int) -> HeldOut:
    index = [item.index for item in seq.items]
    model_in = split_example(0, seq, split, max_seq_len)
    everything = split_example(0, seq, split, len(seq.seq))
    return HeldOut(
        user=seq.index,
        history=tuple(index[p] for p in model_in.history),
        timestamps=model_in.timestamps,
        seen=tuple(index[p] for p in everything.history),
        target=index[model_in.target],
    )


@dataclass
class UserBatch:
    """Users to rank for: the sequence fields ``Recommender.user_vectors`` reads of a :class:`shards.collate.Batch`
    (over an item table of catalog rows), with their targets and earlier items::

        item_rows    (U,)    long    catalog index of each row of the item table
        seq          (B, L)  long    rows of the item table, chronological, right-padded with -1
        seq_mask     (B, L)  bool
        timestamps   (B, L)  double  nan where unknown or padded
        user_index   (B,)    long
        target_item  (B,)    long    catalog index of the held-out item
        seen         (B, H)  long    catalog indices of every earlier item, -1 padded
    """

    item_rows: torch.Tensor
    seq: torch.Tensor
    seq_mask: torch.Tensor
    timestamps: torch.Tensor
    user_index: torch.Tensor
    target_item: torch.Tensor
    seen: torch.Tensor

    def __len__(self) -> int:
        return self.seq.shape[0]


def _padded(rows: Sequence[Sequence[float]], fill: float, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), max(1, max(len(r) for r in rows))), fill, dtype=dtype)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def user_batch(users: Sequence[HeldOut], device: torch.device | str = "cpu") -> UserBatch:
    """Collate held-out users (their histories over a table of the distinct items)."""
    history_BL = _padded([u.history for u in users], -1, torch.long)
    mask_BL = history_BL >= 0
    item_rows_U, inverse = torch.unique(history_BL[mask_BL], return_inverse=True)
    seq_BL = torch.full_like(history_BL, -1)
    seq_BL[mask_BL] = inverse
    stamps = [u.timestamps or [math.nan] * len(u.history) for u in users]
    return UserBatch(
        item_rows=item_rows_U.to(device),
        seq=seq_BL.to(device),
        seq_mask=mask_BL.to(device),
        timestamps=_padded(stamps, math.nan, torch.float64).to(device),
        user_index=torch.tensor([u.user for u in users], dtype=torch.long, device=device),
        target_item=torch.tensor([u.target for u in users], dtype=torch.long, device=device),
        seen=_padded([u.seen for u in users], -1, torch.long).to(device),
    )


# ---- scores -------------------------------------------------------------------------------------------------


def _model_scores(
    model: Recommender, user_BD: torch.Tensor, catalog: ItemEmbeddings, rows: torch.Tensor | slice
) -> torch.Tensor:
    # float64, then rounded to float32: the same value for an item whatever the block shapes
    return model.score(user_BD, _map_fields(select(catalog, rows), _double)).float()


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
        return _padded([d.tolist() for d in drawn], -1, torch.long).to(device)


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
    rank, world = ranks()
    counts: Counter = Counter()
    tallies = {}
    for split in opts.splits:
        tally = Tally(opts.rankings)
        counted = counts if split == opts.splits[0] else None  # every split reads the same samples
        users = held_out_users(folder, split, stream_cfg.max_seq_len, opts.users, opts.seed, rank, world, counted)
        for group in _batched(users, opts.batch_size):
            ranker.add(tally, split, group)
        tally.all_reduce(device)
        tallies[split] = tally
    # every rank reads every sample: its counts are the domain's
    expected = manifest.n_users if not opts.users else min(opts.users, manifest.n_users)
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
    copy = Recommender(cfg.model, cfg.loss, grown, image_size=cfg.data.stream.image_size)
    state = model.state_dict()
    # new items have no interest prototype (-1): as the engine's validation-only domains, no interest memory
    state["prototype_of"] = torch.cat([state["prototype_of"], state["prototype_of"].new_full((manifest.n_items,), -1)])
    copy.load_state_dict(state)
    device = next(model.parameters()).device
    return copy.to(device).eval(), len(catalog.domains)
