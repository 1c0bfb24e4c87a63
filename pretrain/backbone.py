"""The backbone runner shared by both towers: a transformers model run stage by stage, its frozen bottom under
``no_grad`` and cached (in memory, and on disk per bound domain), then its trainable top.

A backbone runs as stages: stage 0 is the stem (embeddings), stages 1.. are its blocks (transformer layers or conv
stages), and a head (final norm) follows. The longest prefix of stages whose parameters all have
``requires_grad=False`` is the *frozen bottom*: it runs under ``torch.no_grad()`` in eval mode (no dropout, BatchNorm
statistics stay fixed) so it builds no autograd graph, and its per-item output can be cached (IISAN-style) keyed by
``(domain, item_index)`` (:mod:`pretrain.frozen_cache`). The bottom is found from the flags at every forward, so
adapters that unfreeze bottom weights (LoRA) shrink it automatically instead of silently losing their gradients.
Under that in-memory cache a disk store (:mod:`pretrain.feature_store`) keeps the bottom's outputs across processes,
for the domains whose items source was bound (:meth:`Backbone.bind_source`), keyed by the exact bytes of the frozen
weights (:func:`bottom_key`).

Shape legend::

    U  items of the batch (text rows)        T  tokens per text (padded to the longest, right-padded)
    N  images of the batch                   P  image tokens: ViT CLS + patches, or conv positions h*w
    H  backbone width                        C, h, w  conv feature map (C = H)
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .families import Family
from .feature_store import SEGMENT_BYTES, DiskCache, Source, digest_of
from .frozen_cache import CacheDevice, FrozenCache

log = logging.getLogger(__name__)

Trainable = Literal["all", "top", "none"]


@torch.no_grad()
def bottom_key(backbone: Backbone, split: int) -> tuple[str, dict[str, Any]] | None:
    """(key, summary) of the frozen bottom of ``split`` stages: the exact bytes of its parameters and buffers, the
    split, the model class and config, the torch and transformers versions and the device type. None when the
    parameters are not all here (ZeRO-3 partitions them): such a bottom is cached in memory only."""
    import transformers

    stages = backbone.stages()[:split]
    tensors = [(f"{i}.{name}", t) for i, stage in enumerate(stages)
               for name, t in itertools.chain(stage.named_parameters(), stage.named_buffers())]  # fmt: skip
    if not tensors or any(getattr(t, "ds_numel", t.numel()) != t.numel() for _, t in tensors):
        return None
    weights = hashlib.sha256()
    for name, t in tensors:
        weights.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        weights.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    model, first = backbone.model, tensors[0][1]
    summary = {"model": type(model).__name__, "split": split, "stages": len(backbone.stages()),
               "dtype": str(first.dtype).removeprefix("torch."), "weights": weights.hexdigest()[:16]}  # fmt: skip
    config = model.config
    key = digest_of(summary, weights.hexdigest(), type(backbone.family).__name__, config.to_dict(),
                    getattr(config, "_attn_implementation", None), first.device.type, torch.__version__,
                    transformers.__version__)  # fmt: skip
    return key, summary


class Backbone(nn.Module):
    """A transformers model run stage by stage: frozen bottom under no_grad (cached on request), then the top.

    ``forward(inputs, mask, keys)`` returns the output of the last block: (U, T, H) token states for text (zero at
    padding), (N, P, H) or (N, C, h, w) for images, before the family's head. ``feature_cache``: the folder of the
    disk store under the cache (None: memory only); ``tower`` names the entries it writes.
    """

    def __init__(
        self,
        model: nn.Module,
        family: Family,
        *,
        gradient_checkpointing: bool = False,
        cache_frozen: bool = False,
        cache_max_items: int = 100_000,
        cache_device: CacheDevice = "cpu",
        cache_check_every: int = 0,
        feature_cache: Path | None = None,
        tower: str = "text",
    ) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.gradient_checkpointing = gradient_checkpointing
        self.cache = FrozenCache(cache_max_items, cache_device, cache_check_every) if cache_frozen else None
        self.disk = DiskCache(feature_cache, tower) if cache_frozen and feature_cache is not None else None
        self.register_load_state_dict_post_hook(_invalidate_after_load)

    def stages(self) -> list[nn.Module]:
        return [self.family.stem(), *self.family.blocks()]

    def set_trainable(self, trainable: Trainable, top_layers: int = 0) -> None:
        """``all``; ``none``; or ``top``: the last ``top_layers`` blocks and the head. Clears the cache."""
        blocks = self.family.blocks()
        if trainable not in ("all", "top", "none"):
            raise ValueError(f"trainable must be 'all', 'top' or 'none', got {trainable!r}")
        if trainable == "top" and not 0 <= top_layers <= len(blocks):
            raise ValueError(f"top_layers must be in [0, {len(blocks)}] for this backbone, got {top_layers}")
        self.model.requires_grad_(trainable == "all")
        if trainable == "top":
            for module in blocks[len(blocks) - top_layers :] + self.family.head():
                module.requires_grad_(True)
        self.invalidate()

    def invalidate(self) -> None:
        """Forget every cached bottom output (after writing the disk store's pending items, if the weights they were
        computed with are still there)."""
        if self.cache is not None:
            self.flush_cache()
            self.cache.invalidate()

    def bind_source(self, domain: int, source: Source) -> None:
        """The items of ``domain`` come from ``source`` (:mod:`pretrain.feature_store`): their bottom outputs may be
        read from and written to the disk store. A changed source drops the domain's items from memory."""
        if self.disk is None or self.cache is None or self.disk.sources.get(domain) == source:
            return
        self.flush_cache()
        self.disk.bind(domain, source)
        self.cache.drop_domain(domain)

    def flush_cache(self) -> int:
        """Write the items computed since the last flush to the disk store; returns how many."""
        disk = self.disk
        if disk is None or disk.bottom is None:
            return 0
        return disk.flush(self._current_key)

    def _current_key(self) -> str | None:
        """The key of the disk store's bottom as the weights are now."""
        assert self.disk is not None
        bottom = bottom_key(self, self.disk.split)
        return None if bottom is None else bottom[0]

    def cache_stats(self) -> dict[str, int]:
        """Items served from memory, read from disk and computed by this process (zeros without a cache)."""
        cache = self.cache
        if cache is None:
            return {"memory": 0, "disk": 0, "computed": 0}
        return {"memory": cache.hits, "disk": cache.disk_hits, "computed": cache.computed}

    def frozen_split(self) -> int:
        """Number of leading stages (stem = stage 0) whose parameters are all frozen."""
        for i, stage in enumerate(self.stages()):
            if any(p.requires_grad for p in stage.parameters()):
                return i
        return len(self.stages())

    def verify_cache(self) -> bool:
        """Recheck the frozen weights against the cache's fingerprint; clears the cache and returns False on change."""
        if self.cache is None:
            return True
        return self.cache.verify(self._bottom_params(self.cache.split))

    def forward(
        self, inputs: torch.Tensor, mask: torch.Tensor | None = None, keys: torch.Tensor | None = None
    ) -> torch.Tensor:
        split = self.frozen_split()
        self._set_modes(split)
        if split == 0:
            return self._run(0, len(self.stages()), inputs, mask)
        x = self._bottom(split, inputs, mask, keys)
        return self._run(split, len(self.stages()), x, mask)

    @torch.no_grad()
    def held(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor]:
        """The frozen-bottom outputs of ``keys`` held now, in memory or in the disk store (those read into memory,
        without the other items of their segments): a forward right after serves them without looking at their
        inputs (:mod:`pretrain.catalog` leaves those unprepared, guarded by ``cache.placeholders``). Empty when
        nothing is frozen or cached."""
        cache, split = self.cache, self.frozen_split()
        if cache is None or split == 0 or not keys:
            return {}
        cache.sync(split, self._bottom_params(split))
        disk = self._disk(split)
        missing = [k for k in keys if k not in cache.entries]
        if missing and disk is not None:
            target = "cpu" if cache.device == "cpu" else next(self.model.parameters()).device
            for key, x in disk.load(missing, whole=False).items():
                cache.put(key, x.to(target), prefetched=True)  # counted as a disk hit when the forward takes it
        return {k: e for k in keys if (e := cache.entries.get(k)) is not None}

    def _bottom_params(self, split: int) -> list[nn.Parameter]:
        return [p for stage in self.stages()[: max(split, 0)] for p in stage.parameters()]

    def _set_modes(self, split: int) -> None:
        """Frozen stages in eval mode (deterministic: no dropout, no BatchNorm statistics updates), the others in
        the backbone's mode (a stage unfrozen since the last forward goes back to training)."""
        for i, stage in enumerate(self.stages()):
            mode = self.training and i >= split
            if stage.training != mode:
                stage.train(mode)

    @torch.no_grad()
    def _bottom(
        self, split: int, inputs: torch.Tensor, mask: torch.Tensor | None, keys: torch.Tensor | None
    ) -> torch.Tensor:
        if self.cache is None or keys is None or inputs.shape[0] == 0:
            return _zero_padding(self._run(0, split, inputs, mask), mask)
        self.cache.sync(split, self._bottom_params(split))
        return self._cached_bottom(split, inputs, mask, keys)

    def _cached_bottom(
        self, split: int, inputs: torch.Tensor, mask: torch.Tensor | None, keys: torch.Tensor
    ) -> torch.Tensor:
        cache = self.cache
        assert cache is not None
        lengths = [None] * inputs.shape[0] if mask is None else _right_padded_lengths(mask)
        key_list = [(int(d), int(i)) for d, i in keys.tolist()]
        entries = [cache.get(k) for k in key_list]
        miss = [u for u, e in enumerate(entries) if e is None]
        disk = self._disk(split)
        if miss and disk is not None:
            miss = self._from_disk(disk, key_list, entries, miss, inputs.device)
        if miss:
            rows = torch.tensor(miss, device=inputs.device)
            sub_mask = None if mask is None else mask[rows]
            x = _zero_padding(self._run(0, split, inputs[rows], sub_mask), sub_mask)
            x = x.to("cpu") if cache.device == "cpu" else x  # one copy for all misses, not one per item
            cache.computed += len(miss)
            for j, u in enumerate(miss):
                entries[u] = x[j, : lengths[u]].clone()  # a copy: a view would keep the whole batch alive
                cache.put(key_list[u], entries[u])
                if disk is not None:
                    disk.add(key_list[u], entries[u])
            if disk is not None and disk.pending_bytes >= SEGMENT_BYTES:
                self.flush_cache()
        if mask is None:
            return torch.stack(entries).to(inputs.device, non_blocking=True)
        x_UTH = nn.utils.rnn.pad_sequence(entries, batch_first=True)  # each entry holds its item's own tokens only
        return F.pad(x_UTH, (0, 0, 0, mask.shape[1] - x_UTH.shape[1])).to(inputs.device, non_blocking=True)

    def _disk(self, split: int) -> DiskCache | None:
        """The disk store, keyed for the current bottom (a new cache generation first flushes the previous
        bottom's items and computes the new key); None without one or for an unhashable bottom."""
        disk, cache = self.disk, self.cache
        if disk is None or cache is None:
            return None
        if disk.generation != cache.generation:
            self.flush_cache()
            disk.reset(cache.generation, split, bottom_key(self, split))
        return disk if disk.bottom is not None else None

    def _from_disk(
        self,
        disk: DiskCache,
        key_list: list[tuple[int, int]],
        entries: list[torch.Tensor | None],
        miss: list[int],
        device: torch.device,
    ) -> list[int]:
        """Fill ``entries[u]`` for the misses the disk store holds (the other items of the segments it read join the
        memory cache too); returns the misses left."""
        cache = self.cache
        assert cache is not None
        found = disk.load(key_list[u] for u in miss)
        wanted = {key_list[u] for u in miss}
        target = "cpu" if cache.device == "cpu" else device
        for key, x in found.items():
            if key not in wanted and key not in cache.entries:
                cache.put(key, x.to(target), prefetched=True)
        for u in miss:
            if (x := found.get(key_list[u])) is not None:
                entries[u] = x.to(target)
                cache.put(key_list[u], entries[u])
                cache.disk_hits += 1
        return [u for u in miss if entries[u] is None]

    def _run(self, start: int, stop: int, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        blocks = self.family.blocks()
        if start == 0 and stop > 0:
            x = self.family.embed(x)
            start = 1
        ctx = self.family.context(x, mask) if start < stop else None
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i in range(start, stop):
            if use_ckpt:
                x = checkpoint(self.family.run_block, blocks[i - 1], x, ctx, use_reentrant=False)
            else:
                x = self.family.run_block(blocks[i - 1], x, ctx)
        return x


def _invalidate_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    module.invalidate()


def _zero_padding(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the token states at padding, so cached (truncated) and fresh bottoms feed the top the same values."""
    return x if mask is None else x * mask[..., None].to(x.dtype)


def _right_padded_lengths(mask_UT: torch.Tensor) -> list[int]:
    lengths_U = mask_UT.sum(1)
    positions_T = torch.arange(mask_UT.shape[1], device=mask_UT.device)
    if not torch.equal(mask_UT.bool(), positions_T[None, :] < lengths_U[:, None]):
        raise ValueError("the text cache needs right-padded attention masks")
    return lengths_U.tolist()
