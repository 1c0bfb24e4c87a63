"""The in-memory cache of frozen-bottom outputs: one tensor per item, keyed by ``(domain, item_index)``, cleared
when the frozen weights change.

Shape legend::

    U  items of the batch        N  images of the batch (rows of ``pixel_values``)
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

CacheDevice = Literal["cpu", "model"]


class PlaceholderMiss(RuntimeError):
    """An item whose encoder inputs were left as placeholders (:attr:`FrozenCache.placeholders`) is not cached: its
    features must not be computed from those inputs; the caller prepares the real inputs and encodes again."""


def item_keys(item_domain_U: torch.Tensor, item_index_U: torch.Tensor) -> torch.Tensor:
    """(U, 2) cache keys ``(domain, item_index)`` of the batch's item table."""
    return torch.stack([item_domain_U, item_index_U], dim=1)


def image_keys(item_domain_U: torch.Tensor, item_index_U: torch.Tensor, image_row_U: torch.Tensor) -> torch.Tensor:
    """(N, 2) cache keys of the rows of ``pixel_values``: row r belongs to the item u with ``image_row[u] == r``."""
    keys_U2 = item_keys(item_domain_U, item_index_U)
    has_U = image_row_U >= 0
    keys_N2 = torch.empty((int(has_U.sum()), 2), dtype=keys_U2.dtype, device=keys_U2.device)
    keys_N2[image_row_U[has_U]] = keys_U2[has_U]
    return keys_N2


class FrozenCache:
    """Bounded LRU of frozen-bottom outputs, one tensor per item keyed by ``(domain, item_index)``.

    Valid for one bottom (``split`` stages) with fixed weights: it clears itself when the split changes, when
    ``invalidate()`` is called (``set_trainable`` and ``load_state_dict`` do), and when ``verify()`` finds that the
    frozen weights' fingerprint changed (checked every ``check_every`` cached forwards when > 0).
    """

    def __init__(self, max_items: int, device: CacheDevice = "cpu", check_every: int = 0) -> None:
        if max_items < 1:
            raise ValueError(f"cache_max_items must be >= 1, got {max_items}")
        if device not in ("cpu", "model"):
            raise ValueError(f"cache_device must be 'cpu' or 'model', got {device!r}")
        self.max_items, self.device, self.check_every = max_items, device, check_every
        self.entries: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self.split = -1
        self.fingerprint: torch.Tensor | None = None
        self.uses = 0
        self.hits = self.misses = 0
        self.computed = self.disk_hits = 0
        """Items whose bottom ran (misses the disk store did not have); items served from the disk store."""
        self.prefetched: set[tuple[int, int]] = set()
        """Items read from disk along with wanted ones and not used yet (their first hit counts as a disk hit)."""
        self.generation = 0
        """Incremented by every clearing: the disk store's bottom key is valid for one generation."""
        self.placeholders: frozenset[tuple[int, int]] = frozenset()
        """Items whose inputs in the coming forwards are placeholders (set by ``pretrain.catalog`` for the items it
        found here and did not tokenize or decode): :meth:`get` raises :class:`PlaceholderMiss` for one it does not
        hold (cleared or evicted since), before anything is computed, so none is ever encoded from placeholders."""

    def __len__(self) -> int:
        return len(self.entries)

    def invalidate(self) -> None:
        self.entries.clear()
        self.prefetched.clear()
        self.split, self.fingerprint = -1, None
        self.generation += 1

    def drop_domain(self, domain: int) -> None:
        """Forget the items of ``domain`` (its items source changed)."""
        for key in [k for k in self.entries if k[0] == domain]:
            del self.entries[key]
            self.prefetched.discard(key)

    def sync(self, split: int, params: list[nn.Parameter]) -> None:
        """Make the cache valid for a bottom of ``split`` stages holding ``params``; clears it if that changed."""
        if split != self.split:
            self.invalidate()
            self.split, self.fingerprint = split, _fingerprint(params)
        self.uses += 1
        if self.check_every > 0 and self.uses % self.check_every == 0:
            self.verify(params)

    def verify(self, params: list[nn.Parameter]) -> bool:
        """True if ``params`` still match the fingerprint; otherwise clear the cache and return False."""
        if self.fingerprint is None or torch.equal(self.fingerprint, _fingerprint(params)):
            return True
        log.info("frozen encoder weights changed: cache of %d items cleared", len(self.entries))
        split = self.split
        self.invalidate()
        self.split, self.fingerprint = split, _fingerprint(params)
        return False

    def get(self, key: tuple[int, int]) -> torch.Tensor | None:
        entry = self.entries.get(key)
        if entry is None:
            if key in self.placeholders:
                raise PlaceholderMiss(f"item {key} was held when its inputs were skipped, and is not any more")
            self.misses += 1
            return None
        if key in self.prefetched:
            self.prefetched.discard(key)
            self.disk_hits += 1
        else:
            self.hits += 1
        self.entries.move_to_end(key)
        return entry

    def put(self, key: tuple[int, int], entry: torch.Tensor, prefetched: bool = False) -> None:
        self.entries[key] = entry
        self.entries.move_to_end(key)
        if prefetched:
            self.prefetched.add(key)
        while len(self.entries) > self.max_items:
            self.prefetched.discard(self.entries.popitem(last=False)[0])


@torch.no_grad()
def _fingerprint(params: list[nn.Parameter]) -> torch.Tensor:
    """(n_params, 2) float64 sums and sums of squares: cheap, and changes with any realistic weight update."""
    if not params:
        return torch.zeros(0, 2, dtype=torch.float64)
    rows = [torch.stack([p.double().sum(), p.double().square().sum()]) for p in params]
    return torch.stack(rows).cpu()
