"""The token memo: each item text is tokenized once per process, and the batches stay those of one tokenizer call
over the batch's texts with padding="longest"."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest
import torch

from shards import collate, tokens
from shards.collate import Collator, split_example
from shards.stream_config import StreamConfig
from shards.tokens import TEXT_CHARS_PER_TOKEN, TokenMemo, load_tokenizer, token_memo

if TYPE_CHECKING:
    from conftest import Domain


def small_cfg(**overrides: Any) -> StreamConfig:
    options = dict(batch_size=4, num_workers=0, image_size=16, max_text_len=8, max_seq_len=5, split="valid")
    return StreamConfig(**{**options, **overrides})


def reference_texts(cfg: StreamConfig, table: list) -> tuple[torch.Tensor, torch.Tensor]:
    """What the collator computed before the memo: one tokenizer call over the batch's texts."""
    budget = cfg.max_text_len * TEXT_CHARS_PER_TOKEN
    enc = load_tokenizer(cfg.text_model)([(it.text or "")[:budget] for _, it in table], padding="longest",
                                         truncation=True, max_length=cfg.max_text_len, return_tensors="pt",
                                         return_token_type_ids=False)  # fmt: skip
    return enc["input_ids"].long(), enc["attention_mask"].long()


class CountingTokenizer:
    """The real tokenizer, counting the texts it is given."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.texts = inner, Counter()

    def __call__(self, texts: list[str], **kwargs: Any) -> Any:
        self.texts.update(texts)
        return self.inner(texts, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> CountingTokenizer:
    """A counting tokenizer behind load_tokenizer, and empty memos before and after."""
    tokenizer = CountingTokenizer(load_tokenizer(StreamConfig().text_model))
    monkeypatch.setattr(tokens, "load_tokenizer", lambda name: tokenizer)
    tokens._token_memos.clear()
    yield tokenizer
    tokens._token_memos.clear()


def examples_of(domains: list[Domain], users: range) -> list[collate.Example]:
    return [split_example(d, dom.sequences[u], "valid", 5) for d, dom in enumerate(domains) for u in users]


def test_batches_are_identical_and_each_item_is_tokenized_once(two_domains, counting) -> None:
    cfg = small_cfg()
    collator = Collator(cfg)
    distinct: set[tuple[int, int]] = set()
    tables = []
    for first in range(0, 5, 1):  # overlapping batches: most of their items were met by an earlier batch
        examples = examples_of(two_domains, range(first, first + 3))
        batch = collator(examples)
        table = [(d, two_domains[d].items[i]) for d, i in zip(batch.item_domain.tolist(), batch.item_index.tolist())]
        input_ids, attention_mask = reference_texts(cfg, table)
        assert batch.input_ids.dtype == torch.long and batch.attention_mask.dtype == torch.long
        assert torch.equal(batch.input_ids, input_ids) and torch.equal(batch.attention_mask, attention_mask)
        distinct |= {(d, it.index) for d, it in table}
        tables.append(len(table))
    assert sum(tables) > len(distinct)  # items did repeat across batches
    memo = token_memo(cfg.text_model, cfg.max_text_len)
    assert memo.tokenized == len(distinct) == len(memo) == sum(counting.texts.values())
    # every text of the synthetic catalogs is its own; "" stands for each item without text
    assert all(n == 1 for text, n in counting.texts.items() if text)


def test_domains_sharing_indices_and_a_changed_text(two_domains, counting) -> None:
    cfg = small_cfg()
    books, films = two_domains[0].items[2], two_domains[1].items[2]  # the same index in two domains
    assert books.text != films.text
    memo = token_memo(cfg.text_model, cfg.max_text_len)
    first = memo.encode([(0, books), (1, films)])
    changed = dataclasses.replace(books, text="another text " * 5)  # another folder at domain position 0
    second = memo.encode([(0, changed), (1, films)])
    assert not torch.equal(first[0][0], second[0][0])
    for got, table in ((first, [(0, books), (1, films)]), (second, [(0, changed), (1, films)])):
        want = reference_texts(cfg, table)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert memo.tokenized == 3 and len(memo) == 2  # the changed text replaced its entry


def test_long_and_missing_texts_and_a_full_memo(two_domains, counting) -> None:
    cfg = small_cfg(max_text_len=6)
    items = two_domains[0].items[:5]
    long = dataclasses.replace(items[0], text="word " * 10_000)  # cut, then truncated to max_text_len tokens
    table = [(0, long), *((0, it) for it in items[1:])]
    assert any(it.text is None for _, it in table)
    memo = TokenMemo(cfg.text_model, cfg.max_text_len, max_bytes=3 * (6 * 4 + tokens._ENTRY_OVERHEAD))
    for _ in range(2):
        got, want = memo.encode(table), reference_texts(cfg, table)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(memo) == 3 and memo.bytes <= memo.max_bytes
    assert memo.tokenized == 5 + 2  # the two items that did not fit are tokenized again
