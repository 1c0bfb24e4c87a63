"""Item encoders: text and image towers over Hugging Face backbones, split into a frozen bottom and a trainable top.

Shape legend::

    U  items of the batch (text rows)        T  tokens per text (padded to the longest, right-padded)
    N  images of the batch                   P  image tokens: ViT CLS + patches, or conv positions h*w
    H  backbone width                        D  encoder output size (out_dim)
    C, h, w  conv feature map (C = H)

A backbone runs as stages: stage 0 is the stem (embeddings), stages 1.. are its blocks (transformer layers or conv
stages), and a head (final norm) follows. The longest prefix of stages whose parameters all have
``requires_grad=False`` is the *frozen bottom*: it runs under ``torch.no_grad()`` in eval mode (no dropout, BatchNorm
statistics stay fixed) so it builds no autograd graph, and its per-item output can be cached (IISAN-style) keyed by
``(domain, item_index)``. The bottom is found from the flags at every forward, so adapters that unfreeze bottom
weights (LoRA) shrink it automatically instead of silently losing their gradients. Under that in-memory cache a disk
store (:mod:`pretrain.feature_store`) keeps the bottom's outputs across processes, for the domains whose items source
was bound (:meth:`Backbone.bind_source`), keyed by the exact bytes of the frozen weights (:func:`bottom_key`).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .feature_store import SEGMENT_BYTES, DiskCache, Source, digest_of

log = logging.getLogger(__name__)

Init = Literal["pretrained", "random"]
Trainable = Literal["all", "top", "none"]
Pooling = Literal["attention", "cls", "mean"]
Architecture = Literal["resnet", "vit", "convnext"]
Projection = Literal["linear", "mlp"]
CacheDevice = Literal["cpu", "model"]


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of ``module``."""
    total = trainable = 0
    for p in module.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


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


def load_backbone(
    name_or_path: str | None, init: Init, config_overrides: dict[str, Any] | None, model_type: str
) -> nn.Module:
    """A transformers base model: pretrained weights from a local folder, or random init from a config.

    ``init="random"`` builds the config from ``name_or_path`` (a local folder) when given, else from
    ``model_type`` (``config_overrides["model_type"]`` wins); ``config_overrides`` update it either way.
    """
    from transformers import AutoConfig, AutoModel  # slow import: only where a model is built

    overrides = dict(config_overrides or {})
    if init == "pretrained":
        if name_or_path is None:
            raise ValueError("init='pretrained' needs name_or_path (a local model folder)")
        overrides.pop("model_type", None)
        return AutoModel.from_pretrained(name_or_path, local_files_only=True, **overrides)
    if init != "random":
        raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
    if name_or_path is None:
        config = AutoConfig.for_model(overrides.pop("model_type", model_type), **overrides)
    else:
        overrides.pop("model_type", None)
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True, **overrides)
    return AutoModel.from_config(config)


# ---- backbone families: how to run each one piece by piece ----------------------------------------------------------


class _Family:
    """Adapter over one family of transformers models. Modules are looked up on every call, so wrappers that replace
    submodules (PEFT, DeepSpeed) are seen."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def stem(self) -> nn.Module:
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def head(self) -> list[nn.Module]:
        """Modules after the blocks (final norms), trainable with the top blocks."""
        return []

    def width(self) -> int:
        return self.model.config.hidden_size

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.stem()(inputs)

    def context(self, x: torch.Tensor, mask: torch.Tensor | None) -> Any:
        """What every block needs besides the hidden states (an attention mask), built once per segment."""
        return None

    def run_block(self, block: nn.Module, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        return block(x)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images only: (pooled_NH, tokens_NPH) from the output of the last block, through the head."""
        raise NotImplementedError


class _BertLike(_Family):
    """BERT, RoBERTa, MiniLM, ELECTRA...: ``embeddings`` then ``encoder.layer``. The NSP pooler is dropped."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if getattr(model, "pooler", None) is not None:
            model.pooler = None

    def stem(self) -> nn.Module:
        return self.model.embeddings

    def blocks(self) -> list[nn.Module]:
        return list(self.model.encoder.layer)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(input_ids=inputs)

    def context(self, x: torch.Tensor, mask: torch.Tensor | None) -> Any:
        from transformers.masking_utils import create_bidirectional_mask

        # the form (4D additive, boolean, None) depends on the attention implementation in the config
        return create_bidirectional_mask(config=self.model.config, inputs_embeds=x, attention_mask=mask)

    def run_block(self, block: nn.Module, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        out = block(x, ctx)
        return out[0] if isinstance(out, tuple) else out


class _ViT(_Family):
    """ViT: ``embeddings`` then ``layers`` (``encoder.layer`` before transformers 5), ``layernorm``; pooled = CLS."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if getattr(model, "pooler", None) is not None:
            model.pooler = None

    def stem(self) -> nn.Module:
        return self.model.embeddings

    def blocks(self) -> list[nn.Module]:
        layers = getattr(self.model, "layers", None)
        return list(layers if layers is not None else self.model.encoder.layer)

    def head(self) -> list[nn.Module]:
        return [self.model.layernorm]

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(inputs.to(self.model.embeddings.patch_embeddings.projection.weight.dtype))

    def run_block(self, block: nn.Module, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        out = block(x, None)
        return out[0] if isinstance(out, tuple) else out

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens_NPH = self.model.layernorm(x)
        return tokens_NPH[:, 0], tokens_NPH


class _ResNet(_Family):
    """ResNet: ``embedder`` then ``encoder.stages``; pooled = spatial mean (parameter-free head)."""

    def stem(self) -> nn.Module:
        return self.model.embedder

    def blocks(self) -> list[nn.Module]:
        return list(self.model.encoder.stages)

    def width(self) -> int:
        return self.model.config.hidden_sizes[-1]

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.embedder(inputs.to(next(self.model.embedder.parameters()).dtype))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.mean((2, 3)), x.flatten(2).transpose(1, 2)


class _ConvNext(_ResNet):
    """ConvNeXt: ``embeddings`` then ``encoder.stages``, ``layernorm``; pooled = layernorm(spatial mean) as in
    transformers, tokens = layernorm of each position."""

    def stem(self) -> nn.Module:
        return self.model.embeddings

    def head(self) -> list[nn.Module]:
        return [self.model.layernorm]

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(inputs.to(next(self.model.embeddings.parameters()).dtype))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        norm = self.model.layernorm
        return norm(x.mean((2, 3))), norm(x.flatten(2).transpose(1, 2))


_IMAGE_FAMILIES: dict[str, type[_Family]] = {"resnet": _ResNet, "vit": _ViT, "convnext": _ConvNext}


def _text_family(model: nn.Module) -> _Family:
    if hasattr(model, "embeddings") and hasattr(getattr(model, "encoder", None), "layer"):
        return _BertLike(model)
    raise ValueError(
        f"unsupported text backbone {type(model).__name__}: expected a BERT-like encoder (embeddings + encoder.layer)"
    )


def _image_family(model: nn.Module, architecture: str) -> _Family:
    if architecture not in _IMAGE_FAMILIES:
        raise ValueError(f"architecture must be one of {sorted(_IMAGE_FAMILIES)}, got {architecture!r}")
    model_type = model.config.model_type
    if model_type != architecture:
        raise ValueError(f"architecture={architecture!r} but the backbone is a {model_type!r} model")
    return _IMAGE_FAMILIES[architecture](model)


# ---- the frozen-bottom cache ----------------------------------------------------------------------------------------


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


# ---- the backbone runner shared by both towers ---------------------------------------------------------------------


class Backbone(nn.Module):
    """A transformers model run stage by stage: frozen bottom under no_grad (cached on request), then the top.

    ``forward(inputs, mask, keys)`` returns the output of the last block: (U, T, H) token states for text (zero at
    padding), (N, P, H) or (N, C, h, w) for images, before the family's head. ``feature_cache``: the folder of the
    disk store under the cache (None: memory only); ``tower`` names the entries it writes.
    """

    def __init__(
        self,
        model: nn.Module,
        family: _Family,
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


def projection_head(kind: Projection, width: int, out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    """Dropout, then ``linear`` (MISSRec's adapter) or ``mlp`` (Linear-GELU-Linear, TransRec's image MLP)."""
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(width, out_dim))
    if kind == "mlp":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(width, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"projection must be 'linear' or 'mlp', got {kind!r}")


# ---- pooling and the two towers -------------------------------------------------------------------------------------


class TokenPooling(nn.Module):
    """Masked pooling of token states: ``attention`` (TransRec additive attention: a learned query ``v`` scores
    ``tanh(W h)``, softmax over real tokens), ``cls`` (first token), ``mean`` (mean over real tokens)."""

    def __init__(self, kind: Pooling, width: int) -> None:
        super().__init__()
        if kind not in ("attention", "cls", "mean"):
            raise ValueError(f"pooling must be 'attention', 'cls' or 'mean', got {kind!r}")
        self.kind = kind
        if kind == "attention":
            self.key = nn.Linear(width, width)
            self.query = nn.Linear(width, 1)

    def forward(self, tokens_UTH: torch.Tensor, mask_UT: torch.Tensor) -> torch.Tensor:
        mask_UT = mask_UT.bool()
        if self.kind == "cls":
            return tokens_UTH[:, 0]
        if self.kind == "mean":
            weights_UT = mask_UT.to(tokens_UTH.dtype)
            weights_UT = weights_UT / weights_UT.sum(1, keepdim=True).clamp(min=1)
        else:
            scores_UT = self.query(torch.tanh(self.key(tokens_UTH))).squeeze(-1)
            scores_UT = scores_UT.masked_fill(~mask_UT, torch.finfo(scores_UT.dtype).min)
            weights_UT = scores_UT.softmax(-1)
        return torch.einsum("ut,uth->uh", weights_UT, tokens_UTH)


class TextEncoder(nn.Module):
    """Text tower: a BERT-like transformers encoder, token pooling, projection to ``out_dim`` (linear by default).

    ``forward(input_ids_UT, attention_mask_UT, keys_U2=None) -> (pooled_UD, tokens_UTD)``: the pooled item
    embedding, and every token state through the same projection (zero at padding; None when ``with_tokens=False``)
    for token-level fusion (Q-Former). Pooling and projection are always trainable; ``trainable`` selects the
    backbone part (``top``: the last ``top_layers`` transformer layers). ``keys_U2`` (:func:`item_keys`) enables
    the frozen-bottom cache when ``cache_frozen``, with a disk store in the folder ``feature_cache`` (None: memory
    only) for the domains bound with :meth:`Backbone.bind_source`.
    """

    def __init__(
        self,
        name_or_path: str | None,
        *,
        init: Init = "pretrained",
        config_overrides: dict[str, Any] | None = None,
        pooling: Pooling = "attention",
        out_dim: int = 64,
        projection: Projection = "linear",
        dropout: float = 0.0,
        trainable: Trainable = "all",
        top_layers: int = 2,
        gradient_checkpointing: bool = False,
        cache_frozen: bool = False,
        cache_max_items: int = 100_000,
        cache_device: CacheDevice = "cpu",
        cache_check_every: int = 0,
        feature_cache: Path | None = None,
    ) -> None:
        super().__init__()
        model = load_backbone(name_or_path, init, config_overrides, "bert")
        family = _text_family(model)
        self.backbone = Backbone(
            model,
            family,
            gradient_checkpointing=gradient_checkpointing,
            cache_frozen=cache_frozen,
            cache_max_items=cache_max_items,
            cache_device=cache_device,
            cache_check_every=cache_check_every,
            feature_cache=feature_cache,
            tower="text",
        )
        self.pool = TokenPooling(pooling, family.width())
        self.proj = projection_head(projection, family.width(), out_dim, dropout)
        self.out_dim = out_dim
        self.set_trainable(trainable, top_layers)

    def set_trainable(self, trainable: Trainable, top_layers: int = 0) -> None:
        """Select the trainable backbone part (pooling and projection stay trainable); clears the cache."""
        self.backbone.set_trainable(trainable, top_layers)

    def invalidate(self) -> None:
        self.backbone.invalidate()

    def forward(
        self,
        input_ids_UT: torch.Tensor,
        attention_mask_UT: torch.Tensor,
        keys_U2: torch.Tensor | None = None,
        *,
        with_tokens: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden_UTH = self.backbone(input_ids_UT, attention_mask_UT, keys_U2)
        pooled_UD = self.proj(self.pool(hidden_UTH, attention_mask_UT))
        if not with_tokens:
            return pooled_UD, None
        tokens_UTD = self.proj(hidden_UTH) * attention_mask_UT[..., None].to(pooled_UD.dtype)
        return pooled_UD, tokens_UTD


class ImageEncoder(nn.Module):
    """Image tower: a transformers ResNet / ViT / ConvNeXt, pooled feature -> projection (MLP by default, as
    TransRec) to ``out_dim``.

    ``forward(pixels_NCHW, keys_N2=None) -> (pooled_ND, tokens_NPD)``: the pooled image embedding, and the
    patch / spatial token states through the same projection (None when ``with_tokens=False``). ``trainable="top"``
    trains the last ``top_layers`` transformer layers (ViT) or stages (ResNet, ConvNeXt) and the final norm.
    ``keys_N2`` (:func:`image_keys`) enables the frozen-bottom cache when ``cache_frozen``; the cache keeps the
    first version of an image it saw, so random augmentation of a cached item is not seen by the bottom;
    ``feature_cache`` as :class:`TextEncoder`'s.
    """

    def __init__(
        self,
        name_or_path: str | None,
        *,
        architecture: Architecture = "resnet",
        init: Init = "random",
        config_overrides: dict[str, Any] | None = None,
        out_dim: int = 64,
        projection: Projection = "mlp",
        dropout: float = 0.0,
        trainable: Trainable = "all",
        top_layers: int = 2,
        gradient_checkpointing: bool = False,
        cache_frozen: bool = False,
        cache_max_items: int = 10_000,
        cache_device: CacheDevice = "cpu",
        cache_check_every: int = 0,
        feature_cache: Path | None = None,
    ) -> None:
        super().__init__()
        model = load_backbone(name_or_path, init, config_overrides, architecture)
        family = _image_family(model, architecture)
        self.backbone = Backbone(
            model,
            family,
            gradient_checkpointing=gradient_checkpointing,
            cache_frozen=cache_frozen,
            cache_max_items=cache_max_items,
            cache_device=cache_device,
            cache_check_every=cache_check_every,
            feature_cache=feature_cache,
            tower="image",
        )
        width = family.width()
        self.proj = projection_head(projection, width, out_dim, dropout)
        self.width, self.out_dim = width, out_dim
        self.set_trainable(trainable, top_layers)

    def set_trainable(self, trainable: Trainable, top_layers: int = 0) -> None:
        """Select the trainable backbone part (the MLP stays trainable); clears the cache."""
        self.backbone.set_trainable(trainable, top_layers)

    def invalidate(self) -> None:
        self.backbone.invalidate()

    def forward(
        self, pixels_NCHW: torch.Tensor, keys_N2: torch.Tensor | None = None, *, with_tokens: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if pixels_NCHW.shape[0] == 0:  # a batch without images: the backbone is not run (ViT refuses N=0)
            empty_NH = pixels_NCHW.new_zeros((0, self.width), dtype=self.proj[1].weight.dtype)
            tokens = self.proj(empty_NH[:, None]) if with_tokens else None
            return self.proj(empty_NH), tokens
        x = self.backbone(pixels_NCHW, None, keys_N2)
        pooled_NH, tokens_NPH = self.backbone.family.features(x)
        return self.proj(pooled_NH), self.proj(tokens_NPH) if with_tokens else None
