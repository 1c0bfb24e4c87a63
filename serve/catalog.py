"""One domain's catalog for serving: every item encoded as evaluation encodes it, the unit vectors the model scores
with, their ids, and the FAISS index over them.

The rows come from :func:`pretrain.catalog.encode_catalog_content` (the encoding :mod:`pretrain.ranking` ranks
against), row c = catalog index c. ``items_UD`` (what ``Recommender.encode_items`` returns: fused content, plus
the ID embedding when hybrid, or the ID embedding alone) is what user histories are made of: the user tower's
table. Its unit rows are the item vectors: ``Recommender.score`` is the cosine, unit user @ unit item, so an exact
inner-product index (``faiss.IndexFlatIP``) over the unit rows, searched with the unit user vector, ranks as the
model does (up to float32 rounding; evaluation scores in float64).

Shape legend::

    C catalog items of the domain    D model width
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from pretrain.catalog import ENCODE_CHUNK, encode_catalog_content
from pretrain.model import ItemEmbeddings, Recommender
from shards import schema
from shards.errors import InputError
from shards.inspect import read_shard
from shards.stream_config import StreamConfig

METRIC = "inner_product"
"""The index's metric: inner product of unit vectors, i.e. the model's cosine score."""


@dataclass
class ServedCatalog:
    """One domain's encoded catalog, row c = catalog index c."""

    domain: str
    ids: list[str]
    """The publisher's item id of each row."""
    table_CD: torch.Tensor
    """float32: the rows user histories are made of (``items_UD``); the user tower's table."""
    vectors_CD: torch.Tensor
    """float32: the unit item vectors the model scores with (what the FAISS index holds)."""
    encoded: ItemEmbeddings
    """Everything ``encode_items`` gave, on the model's device (the reference the user tower is checked against)."""


def item_ids(folder: str | Path) -> list[str]:
    """The item id of every catalog index of ``folder``, read from its items shards (images not extracted)."""
    manifest = schema.load_manifest(folder)
    ids: list[str | None] = [None] * manifest.n_items
    for info in manifest.item_shards:
        path = Path(folder) / info.name
        if not path.is_file():
            raise InputError(f"{path}: listed in the manifest but missing")
        for raw in read_shard(path, select_files=_not_image):
            try:
                item = schema.decode_item(raw, n_items=manifest.n_items)
            except schema.SampleError as e:
                raise InputError(f"{e}: the catalog is incomplete (run `python -m shards verify {folder}`)") from None
            ids[item.index] = item.id
    missing = [c for c, i in enumerate(ids) if i is None]
    if missing:
        raise InputError(f"{folder}: the items shards lack {len(missing)} catalog items (first: index {missing[0]})")
    return [str(i) for i in ids]


def _not_image(name: str) -> bool:
    return not name.endswith(".jpg")  # an items sample's image member (KEY.jpg): only the ids are wanted


@torch.no_grad()
def encode(
    model: Recommender, folder: str | Path, domain: int, stream: StreamConfig, chunk: int = ENCODE_CHUNK
) -> ServedCatalog:
    """The catalog of ``folder`` (model domain ``domain``) encoded as evaluation encodes it (with a progress bar)."""
    encoded = encode_catalog_content(model, folder, domain, stream, chunk).items
    table_CD = encoded.items_UD.float().cpu()
    # normalized in float64 as evaluation scores, then stored in float32
    vectors_CD = F.normalize(encoded.items_UD.double(), dim=-1).float().cpu()
    name = schema.load_manifest(folder).domain
    return ServedCatalog(name, item_ids(folder), table_CD, vectors_CD, encoded)


def flat_index(vectors_CD: torch.Tensor) -> faiss.Index:
    """An exact inner-product index over the rows (FAISS id c = row c = catalog index c)."""
    index = faiss.IndexFlatIP(vectors_CD.shape[1])
    index.add(np.ascontiguousarray(vectors_CD.numpy(), dtype=np.float32))
    return index
