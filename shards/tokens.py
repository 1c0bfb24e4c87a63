"""Item texts -> token ids: the tokenizer, loaded once per process, and the per-process memo that tokenizes each
item's text once instead of at every batch that holds the item.

Shape legend::

    U  items of the table        T  longest tokenized text of the table (<= max_text_len)
"""

from __future__ import annotations

import array
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from shards import schema

TEXT_CHARS_PER_TOKEN = 16
"""An item text is cut to ``max_text_len * TEXT_CHARS_PER_TOKEN`` characters before it is tokenized (and then
truncated to ``max_text_len`` tokens, as always), so what one text costs the tokenizer is bounded (a 20 MB text
took 3 GB and half a minute whole). A token of ordinary text spans a few characters, so the cut leaves the tokens
kept unchanged; only a text whose first characters were mostly whitespace, or words the tokenizer makes one token
of (a word of over 100 characters is one [UNK]), could lose tokens to it."""


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str) -> Any:
    """The tokenizer at ``name`` (a local folder or a cached name), loaded once per process, never downloaded."""
    from transformers import AutoTokenizer  # slow import (seconds): only where texts are tokenized

    return AutoTokenizer.from_pretrained(name, local_files_only=True)


TOKEN_MEMO_BYTES = 256 << 20
"""What the token memo of one process (:func:`token_memo`) may hold, in bytes (ids at 4 bytes a token, plus about
200 bytes of bookkeeping an item): with max_text_len 64, 600k catalog items at least. It holds one entry per
(domain, item index) met, so never more than the catalogs streamed; once full, items not in it are tokenized at
every batch, as without a memo."""


class TokenMemo:
    """The token ids of the item texts this process has tokenized, for one tokenizer and max_text_len: each item's
    text goes through the tokenizer once per process (per DataLoader worker), not once per batch that holds it.

    Keyed by ``(domain, item index)``; an entry also keeps the hash of the text it was made from, and a text that
    differs (another folder at the same domain position, in another stream of the process) is tokenized again and
    replaces the entry. :meth:`encode` gives what one tokenizer call over the batch's texts with
    ``padding="longest"`` gives: each text is tokenized alone (truncated to max_text_len, as a batch call does per
    text) and padded here to the longest of the batch, on the tokenizer's padding side.
    """

    def __init__(self, text_model: str, max_text_len: int, max_bytes: int = TOKEN_MEMO_BYTES) -> None:
        self.text_model, self.max_text_len, self.max_bytes = text_model, max_text_len, max_bytes
        self.entries: dict[tuple[int, int], tuple[int, bytes]] = {}
        """(domain, item index) -> (hash of the text as tokenized, its token ids as int32 bytes)."""
        self.bytes = 0
        self.tokenized = 0
        """Texts sent to the tokenizer (misses)."""

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = self.tokenized = 0

    def encode(
        self, table: Sequence[tuple[int, schema.Item]], held: Mapping[tuple[int, int], int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (U, T) long, of the items' texts (an item without text: "").

        ``held``: (domain, item index) -> token count of the items whose text encoder output is already held
        (:class:`shards.collate.Held`): their texts are not tokenized; their rows are a placeholder of that many
        padding ids, so the attention mask (and T) are as if they had been."""
        held = held or {}
        tokenizer = load_tokenizer(self.text_model)
        budget = self.max_text_len * TEXT_CHARS_PER_TOKEN  # a 200 MB text would cost gigabytes to tokenize
        keys = [(domain, it.index) for domain, it in table]
        texts = ["" if key in held else (it.text or "")[:budget] for key, (_, it) in zip(keys, table)]
        rows: list[bytes | None] = []
        for key, text in zip(keys, texts):
            if key in held:
                rows.append(_placeholder(held[key], tokenizer))
                continue
            entry = self.entries.get(key)
            rows.append(entry[1] if entry is not None and entry[0] == hash(text) else None)
        miss = [u for u, row in enumerate(rows) if row is None]
        if miss:
            self.tokenized += len(miss)
            ids = tokenizer([texts[u] for u in miss], truncation=True, max_length=self.max_text_len,
                            return_attention_mask=False, return_token_type_ids=False)["input_ids"]  # fmt: skip
            for u, row_ids in zip(miss, ids):
                rows[u] = array.array("i", row_ids).tobytes()
                self._keep(keys[u], hash(texts[u]), rows[u])
        return _pad(rows, tokenizer)

    def _keep(self, key: tuple[int, int], text_hash: int, row: bytes) -> None:
        old = self.entries.get(key)
        cost = len(row) + _ENTRY_OVERHEAD
        if old is None and self.bytes + cost > self.max_bytes:
            return
        self.bytes += cost - (0 if old is None else len(old[1]) + _ENTRY_OVERHEAD)
        self.entries[key] = (text_hash, row)


_ENTRY_OVERHEAD = 200
"""Bytes an entry of the token memo costs beyond its ids (dict slot, key and value tuples, bytes header; rounded
up)."""
_token_memos: dict[tuple[str, int], TokenMemo] = {}


def token_memo(text_model: str, max_text_len: int) -> TokenMemo:
    """This process's :class:`TokenMemo` of the tokenizer ``text_model`` at ``max_text_len``. A module global, so it
    lasts as long as the process: a DataLoader worker starts with its parent's (fork) and adds what it tokenizes."""
    key = (text_model, max_text_len)
    if key not in _token_memos:
        _token_memos[key] = TokenMemo(text_model, max_text_len)
    return _token_memos[key]


def _placeholder(n_tokens: int, tokenizer: Any) -> bytes:
    """A row of ``n_tokens`` padding ids (int32 bytes), standing for a text that was not tokenized."""
    if n_tokens < 1:
        raise ValueError(f"a held text needs a positive token count, got {n_tokens}")
    return array.array("i", [tokenizer.pad_token_id or 0]).tobytes() * n_tokens


def _pad(rows: Sequence[bytes | None], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 token-id rows -> (U, T) input_ids and attention_mask (long), padded as the tokenizer pads."""
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer {tokenizer.name_or_path!r} has no padding token")
    lengths_U = torch.tensor([len(row) // 4 for row in rows], dtype=torch.long)
    T = int(lengths_U.max()) if len(rows) else 0
    positions_T = torch.arange(T)
    if tokenizer.padding_side == "left":
        real_UT = positions_T >= (T - lengths_U)[:, None]
    else:
        real_UT = positions_T < lengths_U[:, None]
    input_ids_UT = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    joined = b"".join(row for row in rows if row is not None)
    if joined:  # frombuffer refuses an empty buffer
        input_ids_UT[real_UT] = torch.frombuffer(bytearray(joined), dtype=torch.int32).long()
    return input_ids_UT, real_UT.long()
