"""Catalog encoding over a filled feature store prepares only what it must (pretrain.catalog, shards.collate.Held):
the texts and images whose frozen features are held are neither tokenized nor decoded, the embeddings are the same
bit for bit as collating everything, an item the store misses is encoded from its real inputs, and placeholders
never reach a frozen bottom (not even when a held item is gone by the forward)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import pretrain.catalog
import shards.pixel_memo
from pretrain.catalog import EncodedCatalog, catalog_chunks, encode_catalog_content
from pretrain.config import TrainConfig
from pretrain.frozen_cache import FrozenCache, PlaceholderMiss
from pretrain.model import Catalog, Recommender
from shards import schema
from shards.collate import Held, collate_items
from shards.pixel_memo import pixel_memo
from shards.tokens import token_memo
from tests.pretrain.test_feature_store import tiny_cfg

FROZEN = ("model.text.trainable=none", "model.image.trainable=none")


def fresh_model(cfg: TrainConfig, folders: list[str]) -> Recommender:
    """A new process's model: the same weights, an empty memory cache, empty token and pixel memos."""
    stream = cfg.data.stream
    token_memo(stream.text_model, stream.max_text_len).clear()
    pixel_memo(stream.image_size, stream.image_memo_mb << 20).clear()
    torch.manual_seed(0)
    catalog = Catalog.from_folders(folders)
    return Recommender(cfg.model, cfg.loss, catalog, image_size=cfg.data.stream.image_size).eval()


class Prepared:
    """Counts the texts tokenized and the images decoded while encoding, and records every input that reaches a
    frozen bottom's first stage (to check that no placeholder does)."""

    def __init__(self, model: Recommender, cfg: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> None:
        self.memo = token_memo(cfg.data.stream.text_model, cfg.data.stream.max_text_len)
        self.decoded = 0
        self.text_inputs: list[torch.Tensor] = []
        self.image_inputs: list[torch.Tensor] = []
        decode = shards.pixel_memo.decode_image

        def counting_decode(*args, **kw):
            self.decoded += 1
            return decode(*args, **kw)

        monkeypatch.setattr(shards.pixel_memo, "decode_image", counting_decode)
        for tower, into in ((model.text, self.text_inputs), (model.image, self.image_inputs)):
            tower.backbone.stages()[0].register_forward_pre_hook(self._record(into), with_kwargs=True)

    @staticmethod
    def _record(into: list[torch.Tensor]):
        def hook(_module, args, kwargs):
            into.append(next(iter([*args, *kwargs.values()])).detach().clone())

        return hook

    @property
    def tokenized(self) -> int:
        return self.memo.tokenized

    def assert_no_placeholder_reached_a_bottom(self) -> None:
        for ids_MT in self.text_inputs:  # a real text starts with [CLS]; a placeholder row is all padding
            assert (ids_MT[:, 0] != 0).all(), "a placeholder text reached the frozen bottom"
        for pixels_NCHW in self.image_inputs:  # a placeholder image is one constant per channel
            flat_NC = pixels_NCHW.flatten(2)
            assert (flat_NC.amax(2) > flat_NC.amin(2)).any(1).all(), "a placeholder image reached the frozen bottom"


def encode(cfg: TrainConfig, folders: list[str], folder: str, monkeypatch, chunk: int = 8):
    model = fresh_model(cfg, folders)
    prepared = Prepared(model, cfg, monkeypatch)
    out = encode_catalog_content(model, folder, folders.index(folder), cfg.data.stream, chunk=chunk)
    monkeypatch.undo()
    return out, prepared, model


def assert_same(a: EncodedCatalog, b: EncodedCatalog) -> None:
    for name in ("items_UD", "content_UD", "text_UD", "image_UD", "has_text_U", "has_image_U", "rows_U"):
        x, y = getattr(a.items, name), getattr(b.items, name)
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), name
    assert torch.equal(a.modality_C, b.modality_C)


def catalog_items(folder: str) -> list[schema.Item]:
    return [it for chunk in catalog_chunks(folder, 0, chunk=1000) for _, it in chunk]


@pytest.fixture(params=["frozen", "top"])
def towers(request) -> tuple[str, ...]:
    """Both towers frozen whole, or their top layer trained (then the cached bottom still feeds a top)."""
    return FROZEN if request.param == "frozen" else ()


def test_a_filled_store_prepares_nothing_and_encodes_bit_identically(folders, tmp_path, monkeypatch, towers):
    folder = folders[1]
    items = catalog_items(folder)
    n, n_images = len(items), sum(it.image is not None for it in items)
    assert n_images and n_images < n  # the synthetic domain mixes items with and without an image
    eager, prep, _ = encode(tiny_cfg(folders, tmp_path / "none", "model.feature_cache_dir=none", *towers), folders,
                            folder, monkeypatch)  # fmt: skip
    assert prep.tokenized == n and prep.decoded == n_images
    cfg = tiny_cfg(folders, tmp_path / "store", *towers)
    cold, prep, _ = encode(cfg, folders, folder, monkeypatch)
    assert prep.tokenized == n and prep.decoded == n_images
    warm, prep, model = encode(cfg, folders, folder, monkeypatch)
    assert prep.tokenized == 0 and prep.decoded == 0 and not prep.text_inputs and not prep.image_inputs
    assert model.feature_cache_stats()["text"] == {"memory": 0, "disk": n, "computed": 0}
    assert model.feature_cache_stats()["image"] == {"memory": 0, "disk": n_images, "computed": 0}
    assert_same(warm, eager)
    assert_same(cold, eager)


def fill_some(cfg: TrainConfig, folders: list[str], folder: str, keep: set[int]) -> None:
    """A store holding the frozen features of the items ``keep`` only."""
    model = fresh_model(cfg, folders)
    domain = folders.index(folder)
    model.bind_items(domain, folder, cfg.data.stream)
    with torch.no_grad():
        model.encode_items(collate_items([(domain, it) for it in catalog_items(folder) if it.index in keep],
                                         cfg.data.stream))  # fmt: skip
    assert model.flush_feature_cache() > 0


def test_items_the_store_misses_are_prepared_from_their_real_inputs(folders, tmp_path, monkeypatch):
    folder = folders[0]
    items = catalog_items(folder)
    keep = {it.index for it in items if it.index % 3 == 0}  # every chunk of 8 mixes held and missing items
    missing = [it for it in items if it.index not in keep]
    fill_some(tiny_cfg(folders, tmp_path / "store", *FROZEN), folders, folder, keep)
    shutil.copytree(tmp_path / "store", tmp_path / "copy")
    # the reference: the same store, every input prepared (the held items' features were computed in another
    # table, so they may differ in the last bits from ones computed in this chunk: compare like with like)
    monkeypatch.setattr(pretrain.catalog, "_held", lambda *_: Held())
    eager, prep, _ = encode(tiny_cfg(folders, tmp_path / "copy", *FROZEN), folders, folder, monkeypatch)
    assert prep.tokenized == len(items)
    cfg = tiny_cfg(folders, tmp_path / "store", *FROZEN)
    lazy, prep, model = encode(cfg, folders, folder, monkeypatch)
    assert prep.tokenized == len(missing) and prep.decoded == sum(it.image is not None for it in missing)
    stats = model.feature_cache_stats()
    assert stats["text"]["computed"] == len(missing) and stats["text"]["disk"] == len(keep)
    assert sum(len(x) for x in prep.text_inputs) == len(missing)
    prep.assert_no_placeholder_reached_a_bottom()
    assert_same(lazy, eager)


def test_a_held_item_gone_by_the_forward_is_encoded_from_its_real_inputs(folders, tmp_path, monkeypatch, caplog):
    """The image cache loses what it held between the check and the forward (evicted, and its segments pruned):
    the forward refuses the placeholders before computing anything, and the chunk is collated whole and encoded
    again, from the real images."""
    folder = folders[1]
    eager, _, _ = encode(tiny_cfg(folders, tmp_path / "none", "model.feature_cache_dir=none", *FROZEN), folders,
                         folder, monkeypatch)  # fmt: skip
    cfg = tiny_cfg(folders, tmp_path / "store", *FROZEN)
    encode(cfg, folders, folder, monkeypatch)
    model = fresh_model(cfg, folders)
    backbone = model.image.backbone
    held = backbone.held

    def held_then_forgotten(keys: list[tuple[int, int]]) -> dict:
        out = held(keys)
        backbone.cache.entries.clear()
        for path in backbone.disk.entry(keys[0][0]).folder.glob("seg-*"):
            path.unlink()
        backbone.disk.release()
        return out

    monkeypatch.setattr(backbone, "held", held_then_forgotten)
    prep = Prepared(model, cfg, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pretrain.catalog"):
        lazy = encode_catalog_content(model, folder, folders.index(folder), cfg.data.stream, chunk=8)
    assert "is not any more" in caplog.text
    n_images = sum(it.image is not None for it in catalog_items(folder))
    assert prep.decoded == n_images and model.feature_cache_stats()["image"]["computed"] == n_images
    prep.assert_no_placeholder_reached_a_bottom()
    assert not backbone.cache.placeholders and not model.text.backbone.cache.placeholders
    assert_same(lazy, eager)


def test_a_cache_refuses_a_placeholder_it_does_not_hold():
    cache = FrozenCache(max_items=2)
    cache.put((0, 1), torch.ones(3))
    cache.placeholders = frozenset({(0, 1), (0, 2)})
    assert torch.equal(cache.get((0, 1)), torch.ones(3))
    assert cache.get((0, 3)) is None  # not a placeholder: an ordinary miss, computed by the caller
    with pytest.raises(PlaceholderMiss, match=r"\(0, 2\)"):
        cache.get((0, 2))


def test_held_items_differ_from_the_eager_table_only_in_their_placeholder_inputs(folders):
    cfg = tiny_cfg(folders, Path("unused")).data.stream
    pairs = [(0, it) for it in catalog_items(folders[1])][:12]
    eager = collate_items(pairs, cfg)
    lengths = eager.attention_mask.sum(1).tolist()
    with_image = [u for u, (_, it) in enumerate(pairs) if it.image is not None]
    text_rows, image_items = [0, 3, 4, 11], with_image[::2]
    held = Held({(0, pairs[u][1].index): lengths[u] for u in text_rows}, {(0, pairs[u][1].index) for u in image_items})
    lazy = collate_items(pairs, cfg, held=held)
    for name, x in eager.fields().items():
        if name not in ("input_ids", "pixel_values"):
            assert torch.equal(x, getattr(lazy, name)), name
    other = [u for u in range(len(pairs)) if u not in text_rows]
    assert torch.equal(lazy.input_ids[other], eager.input_ids[other])
    assert (lazy.input_ids[text_rows] == 0).all()  # padding ids: never tokenized
    image_rows = eager.image_row[image_items]
    real = [r for r in range(len(eager.pixel_values)) if r not in image_rows.tolist()]
    assert torch.equal(lazy.pixel_values[real], eager.pixel_values[real])
    assert (lazy.pixel_values[image_rows] == 0).all() and (eager.pixel_values[image_rows] != 0).any()


def _chunks(folder: str, world: int) -> Iterator[list[int]]:
    for rank in range(world):
        yield [it.index for chunk in catalog_chunks(folder, 0, chunk=8, rank=rank, world=world) for _, it in chunk]


def test_the_ranks_chunks_cover_the_catalog_once(folders):
    n = schema.load_manifest(folders[0]).n_items
    per_rank = list(_chunks(folders[0], 3))
    assert sorted(i for rank in per_rank for i in rank) == list(range(n))
    assert per_rank[1][:8] == list(range(8, 16))  # chunk k goes to rank k mod world
