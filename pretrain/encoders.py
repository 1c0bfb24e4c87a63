"""Item encoders: the text and image towers (a backbone, token pooling, a projection head), each split into a frozen
bottom and a trainable top by :class:`~pretrain.backbone.Backbone`.

Shape legend::

    U  items of the batch (text rows)        T  tokens per text (padded to the longest, right-padded)
    N  images of the batch                   P  image tokens: ViT CLS + patches, or conv positions h*w
    H  backbone width                        D  encoder output size (out_dim)
    C, h, w  conv feature map (C = H)

Backbones load and run by family (:mod:`pretrain.families`); the frozen bottom's outputs are cached in memory
(:mod:`pretrain.frozen_cache`) and on disk (:mod:`pretrain.feature_store`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .backbone import Backbone, Trainable
from .families import Architecture, Init, image_family, load_backbone, text_family
from .frozen_cache import CacheDevice

Pooling = Literal["attention", "cls", "mean"]
Projection = Literal["linear", "mlp"]


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of ``module``."""
    total = trainable = 0
    for p in module.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def projection_head(kind: Projection, width: int, out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    """Dropout, then ``linear`` (MISSRec's adapter) or ``mlp`` (Linear-GELU-Linear, TransRec's image MLP)."""
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(width, out_dim))
    if kind == "mlp":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(width, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"projection must be 'linear' or 'mlp', got {kind!r}")


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
        family = text_family(model)
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
        family = image_family(model, architecture)
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
