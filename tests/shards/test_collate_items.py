"""collate_items: a catalog chunk collated by the same code path as a training batch's item table."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import pytest
import torch

from shards import schema
from shards.collate import Batch, Collator, ItemTable, collate_items, split_example
from shards.inspect import read_shard
from shards.stream_config import StreamConfig
from shards.tokens import TEXT_CHARS_PER_TOKEN, load_tokenizer

if TYPE_CHECKING:
    from conftest import Domain


def small_cfg(**overrides) -> StreamConfig:
    options = dict(batch_size=4, num_workers=0, image_size=16, max_text_len=16, max_seq_len=5, split="valid")
    return StreamConfig(**{**options, **overrides})


def test_item_fields_are_those_of_batch() -> None:
    names = list(ItemTable.__dataclass_fields__)
    assert names == [n for n in Batch.__dataclass_fields__ if n in names]
    assert set(names) == {"item_domain", "item_index", "input_ids", "attention_mask", "has_text", "pixel_values",
                          "image_row", "has_image", "pixel_mean", "pixel_std"}  # fmt: skip


def test_same_tensors_as_the_batch_item_table(two_domains: list[Domain]) -> None:
    cfg = small_cfg(image_mean=(0.5, 0.4, 0.3))
    examples = [split_example(d, dom.sequences[u], "valid", 5) for d, dom in enumerate(two_domains) for u in range(5)]
    batch = Collator(cfg)(examples)
    pairs = [(d, two_domains[d].items[i]) for d, i in zip(batch.item_domain.tolist(), batch.item_index.tolist())]
    table = collate_items(pairs, cfg)
    assert len(table) == len(batch.item_index)
    for name, tensor in table.fields().items():
        assert torch.equal(tensor, getattr(batch, name)), name
    torch.testing.assert_close(table.normalized_pixels(), batch.normalized_pixels(), rtol=0, atol=0)
    moved = table.to("cpu")
    assert isinstance(moved, ItemTable) and torch.equal(moved.input_ids, table.input_ids)


def test_catalog_read_from_the_items_shard(make_domain) -> None:
    dom = make_domain("shop", [6], n_items=9, bad_images=[2])
    raws = read_shard(dom.folder / schema.shard_name("items", 0))
    counts: Counter = Counter()
    table = collate_items([(3, schema.decode_item(raw)) for raw in raws], small_cfg(), counts)
    assert table.item_index.tolist() == list(range(9)) and (table.item_domain == 3).all()
    assert table.has_text.tolist() == [it.text is not None for it in dom.items]
    assert table.has_image.tolist() == [it.image is not None and i != 2 for i, it in enumerate(dom.items)]
    assert counts == {"bad_images": 1}
    assert table.pixel_values.shape == (int(table.has_image.sum()), 3, 16, 16)
    assert table.normalized_pixels(torch.bfloat16).dtype == torch.bfloat16


def test_empty_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one item"):
        collate_items([], small_cfg())


class _SpyTokenizer:
    """The stream's tokenizer, recording the longest text it was given."""

    def __init__(self, real) -> None:
        self.real, self.longest = real, 0

    def __call__(self, texts: list[str], **options):
        self.longest = max(self.longest, *map(len, texts))
        return self.real(texts, **options)

    def __getattr__(self, name: str):
        return getattr(self.real, name)  # pad_token_id, padding_side: the collator pads the memo's rows itself


def test_a_huge_text_is_cut_before_the_tokenizer_sees_it(monkeypatch) -> None:
    """A 2-million-character item text reaches the tokenizer cut to max_text_len x TEXT_CHARS_PER_TOKEN
    characters (tokenized whole, a 20 MB text took 3 GB and half a minute), and still fills max_text_len tokens."""
    import shards.tokens as tokens

    cfg = small_cfg()
    spy = _SpyTokenizer(tokens.load_tokenizer(cfg.text_model))
    monkeypatch.setattr(tokens, "load_tokenizer", lambda name: spy)
    items = [(0, schema.Item(0, "huge", "many words " * 200_000)), (0, schema.Item(1, "small", "a short text"))]
    table = collate_items(items, cfg)
    assert spy.longest == cfg.max_text_len * tokens.TEXT_CHARS_PER_TOKEN
    assert table.input_ids.shape == (2, cfg.max_text_len) and table.attention_mask[0].all()


@pytest.mark.parametrize("max_text_len", [4, 16, 64])
def test_cutting_texts_changes_no_token_of_ordinary_texts(two_domains: list[Domain], max_text_len: int) -> None:
    """Item texts of every length, up to many times the character budget, give the tokens the whole text gives."""
    cfg = small_cfg(max_text_len=max_text_len)
    words = " ".join(it.text for it in two_domains[0].items if it.text is not None)
    texts = [words[:n] for n in (0, 1, 7, 100, 1000, 5000)]
    texts += [(words + " ") * 40, "naïve café " * 3000, "日本語の長いテキスト。" * 2000]
    table = collate_items([(0, schema.Item(i, str(i), t)) for i, t in enumerate(texts)], cfg)
    whole = load_tokenizer(cfg.text_model)(texts, padding="longest", truncation=True, max_length=max_text_len,
                                            return_tensors="pt", return_token_type_ids=False)  # fmt: skip
    assert len(max(texts, key=len)) > 10 * max_text_len * TEXT_CHARS_PER_TOKEN
    assert torch.equal(table.input_ids, whole["input_ids"])
    assert torch.equal(table.attention_mask, whole["attention_mask"])
