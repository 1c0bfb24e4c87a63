"""A domain's catalog: which folders make a run's catalog, their items read from the shards, and encoded by a model.

The model's domain index of a folder is the position of its catalog in :func:`catalog_folders`. A catalog is read
from the domain's ``items-*.tar`` shards in order (:func:`catalog_chunks`), ``chunk`` items per table; with a
process group every rank encodes its share of the chunks and the rows are all-gathered
(:func:`encode_catalog_content`), so ranking (:mod:`pretrain.ranking`) and the interest refresh
(:func:`pretrain.validate.refresh_interests`) see every item once, row c = catalog index c. Only the inputs the
model needs are prepared: an item whose frozen-bottom output is in memory or in the disk store is neither
tokenized nor decoded (:func:`_encode_chunk`).

Shape legend::

    C catalog items of the domain    U rows of an item table
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shards import schema
from shards.collate import Held, ItemTable, collate_items
from shards.errors import InputError
from shards.inspect import read_shard
from shards.progress import bar
from shards.stream_config import StreamConfig
from shards.subset import catalog_id

from . import distributed
from .config import TrainConfig
from .frozen_cache import PlaceholderMiss
from .model import ItemEmbeddings, Recommender

log = logging.getLogger(__name__)

ENCODE_CHUNK = 256
"""Catalog items encoded per call."""


# ---- the run's catalog ---------------------------------------------------------------------------------------


def catalog_folders(cfg: TrainConfig) -> list[str]:
    """The catalog's domains: the training domains in stream order, then validation-only ones with a catalog not
    already there (the model's domain index of a folder is the position of its catalog here; a user subset and
    its parent share one: :func:`shards.subset.catalog_id`)."""
    folders = list(cfg.data.domains)
    known = {catalog_id(f) for f in folders}
    for folder in cfg.data.valid_domains or []:
        if (identity := catalog_id(folder)) not in known:
            known.add(identity)
            folders.append(folder)
    return folders


def valid_folders(cfg: TrainConfig) -> list[str]:
    """The validation domains: data.valid_domains, or the training domains when it is unset."""
    return list(cfg.data.domains if cfg.data.valid_domains is None else cfg.data.valid_domains)


# ---- encoded rows -----------------------------------------------------------------------------------------------


def map_fields(emb: ItemEmbeddings, fn: Callable[..., torch.Tensor], *args: Any) -> ItemEmbeddings:
    """``fn(tensor, *args)`` on every tensor field (None stays None)."""
    fields = {f.name: getattr(emb, f.name) for f in dataclasses.fields(emb)}
    return ItemEmbeddings(**{name: None if x is None else fn(x, *args) for name, x in fields.items()})


def _index(x: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    return x[rows]


def select(emb: ItemEmbeddings, rows: torch.Tensor | slice) -> ItemEmbeddings:
    """The rows ``rows`` of every field."""
    return map_fields(emb, _index, rows)


def cat_embeddings(parts: Sequence[ItemEmbeddings]) -> ItemEmbeddings:
    """Row-wise concatenation of encoded chunks."""
    names = [f.name for f in dataclasses.fields(ItemEmbeddings)]
    joined = {n: None if getattr(parts[0], n) is None else torch.cat([getattr(p, n) for p in parts]) for n in names}
    return ItemEmbeddings(**joined)


# ---- the catalog ---------------------------------------------------------------------------------------------


def catalog_chunks(
    folder: str | Path, domain: int, chunk: int = ENCODE_CHUNK, rank: int = 0, world: int = 1
) -> Iterator[list[tuple[int, schema.Item]]]:
    """The catalog of ``folder`` (its items shards, in order) as chunks of ``chunk`` (domain, item) pairs; only the
    chunks numbered ``rank`` mod ``world`` are yielded. Every rank reads and schema-checks every item, so that a bad
    one stops all ranks alike (one rank stopping alone would leave the others waiting in a collective)."""
    manifest = schema.load_manifest(folder)
    pending: list[tuple[int, schema.Item]] = []
    number = 0
    for info in manifest.item_shards:
        for raw in _catalog_samples(Path(folder), info):
            pending.append((domain, _catalog_item(raw, manifest.n_items)))
            if len(pending) == chunk:
                if number % world == rank:
                    yield pending
                pending, number = [], number + 1
    if pending and number % world == rank:
        yield pending


def catalog_tables(
    folder: str | Path, domain: int, cfg: StreamConfig, chunk: int = ENCODE_CHUNK, rank: int = 0, world: int = 1
) -> Iterator[ItemTable]:
    """The chunks of :func:`catalog_chunks` as item tables (texts tokenized, images decoded)."""
    for items in catalog_chunks(folder, domain, chunk, rank, world):
        yield collate_items(items, cfg)


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
    """Every rank's rows of each field, concatenated in rank order (:func:`pretrain.distributed.all_gather_rows`).
    ``local`` is None on a rank that encoded nothing; None if none did."""
    world = distributed.world_size()
    if world == 1:
        return local
    spec = None if local is None else {k: None if v is None else (v.shape[1:], v.dtype) for k, v in local.items()}
    specs: list[Any] = [None] * world
    torch.distributed.all_gather_object(specs, spec)  # the field shapes, for the ranks that encoded nothing
    spec = next((s for s in specs if s is not None), None)
    if spec is None:
        return None
    out: dict[str, torch.Tensor | None] = {}
    for name, s in spec.items():
        if s is None:
            out[name] = None
            continue
        shape, dtype = s
        x = torch.empty((0, *shape), dtype=dtype, device=device) if local is None else local[name]
        out[name] = distributed.all_gather_rows(x)
    return out


@torch.no_grad()
def encode_catalog_content(
    model: Recommender, folder: str | Path, domain: int, cfg: StreamConfig, chunk: int = ENCODE_CHUNK
) -> EncodedCatalog:
    """The whole catalog of ``folder`` (model domain ``domain``) encoded, with each item's stored modalities.
    With a process group, every rank encodes its share of the chunks and receives all rows (every rank must call
    it). Frozen-bottom outputs come from and go to the disk store (model.feature_cache_dir) when the model caches
    them; rank 0 shows a progress bar and logs how many items the cache held."""
    rank, world = distributed.ranks()
    device = next(model.parameters()).device
    model.bind_items(domain, folder, cfg)
    before = model.feature_cache_stats()
    share = _share(model.catalog.n_items[domain], chunk, rank, world)
    parts = []
    with bar(total=share, enabled=rank == 0, desc=f"encoding {Path(folder).name}", unit="item") as progress:
        for items in catalog_chunks(folder, domain, chunk, rank, world):
            emb, table = _encode_chunk(model, items, cfg, device)
            fields = {f.name: getattr(emb, f.name) for f in dataclasses.fields(emb)}
            fields = {k: None if v is None else v.detach() for k, v in fields.items()}
            parts.append({**fields, "data_text": table.has_text.to(device), "data_image": table.has_image.to(device)})
            progress.update(len(table.item_index))
    model.flush_feature_cache()
    _release_segments(model)
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


def _encode_chunk(
    model: Recommender, items: list[tuple[int, schema.Item]], cfg: StreamConfig, device: torch.device
) -> tuple[ItemEmbeddings, ItemTable]:
    """A chunk of the catalog encoded, and its table. The texts and images whose frozen-bottom outputs the model
    holds (in memory or on disk) are neither tokenized nor decoded (:class:`shards.collate.Held`): their inputs are
    placeholders that the model's caches refuse to encode; should one of those items be gone by the forward, the
    chunk is collated whole and encoded again. The result is the same bit for bit as collating everything."""
    held = _held(model, items) if cfg.item_content else Held()
    if held.text_tokens or held.images:
        table = collate_items(items, cfg, held=held)
        try:
            with _placeholders(model, held):
                return model.encode_items(table.to(device)), table
        except PlaceholderMiss as e:
            log.warning("catalog encoding: %s; its chunk's inputs are prepared whole", e)
    table = collate_items(items, cfg)
    return model.encode_items(table.to(device)), table


def _held(model: Recommender, items: list[tuple[int, schema.Item]]) -> Held:
    """The items of ``items`` whose frozen-bottom outputs the model's towers hold now (read from disk into memory)."""
    keys = [(d, it.index) for d, it in items]
    text_tokens: dict[tuple[int, int], int] = {}
    images: frozenset[tuple[int, int]] = frozenset()
    if model.text is not None:  # a text entry holds the item's own token states: (its token count, H)
        text_tokens = {k: x.shape[0] for k, x in model.text.backbone.held(keys).items()}
    if model.image is not None:
        with_image = [k for k, (_, it) in zip(keys, items) if it.image is not None]
        images = frozenset(model.image.backbone.held(with_image))
    return Held(text_tokens, images)


@contextlib.contextmanager
def _placeholders(model: Recommender, held: Held) -> Iterator[None]:
    """While inside, the towers' caches refuse to compute the held items (their inputs are placeholders)."""
    towers = [(t, keys) for t, keys in ((model.text, held.text_tokens), (model.image, held.images)) if t is not None]
    for tower, keys in towers:
        if keys:
            assert tower.backbone.cache is not None, "held items without a cache"
            tower.backbone.cache.placeholders = frozenset(keys)
    try:
        yield
    finally:
        for tower, _ in towers:
            if tower.backbone.cache is not None:
                tower.backbone.cache.placeholders = frozenset()


def _release_segments(model: Recommender) -> None:
    """Free the feature-store segments the towers kept while the catalog was read."""
    for tower in (model.text, model.image):
        if tower is not None and tower.backbone.disk is not None:
            tower.backbone.disk.release()


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
