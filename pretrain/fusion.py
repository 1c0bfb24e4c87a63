"""Item embedding from text and image, robust to a missing modality.

Shape legend::

    U  items of the batch        D  embedding size        B  users (sequence representations)
    T  text tokens               P  image tokens          M  memory tokens of the Q-Former (1 + T + 1 + P)
    Q  Q-Former query tokens     N  images of the batch (rows of pixel_values)

Every kind takes per-item modality embeddings aligned with the item table (use :func:`rows_to_items` to spread the
image encoder's (N, ...) rows over the U items) and the ``has_text`` / ``has_image`` masks. A missing modality's
rows are never read (``torch.where``, not multiplication), so garbage or NaN there cannot leak into the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .user import Attention

FusionKind = Literal["sum", "concat", "gated", "score", "qformer"]


def rows_to_items(x_N: torch.Tensor, image_row_U: torch.Tensor) -> torch.Tensor:
    """Spread per-image rows (N, ...) over the item table (U, ...): row ``image_row[u]``, zeros where it is -1."""
    has_U = image_row_U >= 0
    out = x_N.new_zeros((image_row_U.shape[0], *x_N.shape[1:]))
    if x_N.shape[0] == 0:
        return out
    return out.index_put((has_U.nonzero().squeeze(1),), x_N[image_row_U[has_U]])


def _masked(x_UD: torch.Tensor | None, has_U: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` where the item has the modality, 0 elsewhere (and 0 everywhere when ``x`` is None)."""
    if x_UD is None:
        return torch.zeros_like(like)
    return torch.where(has_U[:, None], x_UD, torch.zeros((), dtype=x_UD.dtype, device=x_UD.device))


@dataclass
class Modalities:
    """What a fusion reads: pooled embeddings (U, D) (None: the modality is absent from the model), availability
    masks (U,), and optional token states for token-level fusion: text (U, T, D) with its mask (U, T), image
    (U, P, D)."""

    text_UD: torch.Tensor | None
    image_UD: torch.Tensor | None
    has_text_U: torch.Tensor
    has_image_U: torch.Tensor
    text_tokens: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None

    def reference(self) -> torch.Tensor:
        """A (U, D) tensor giving the batch size, dtype and device."""
        if self.text_UD is None and self.image_UD is None:
            raise ValueError("fusion needs at least one of text_UD and image_UD")
        return self.text_UD if self.text_UD is not None else self.image_UD

    def text(self) -> torch.Tensor:
        """(U, D) text embeddings, 0 where missing."""
        return _masked(self.text_UD, self.has_text_U, self.reference())

    def image(self) -> torch.Tensor:
        """(U, D) image embeddings, 0 where missing."""
        return _masked(self.image_UD, self.has_image_U, self.reference())


class Fusion(nn.Module):
    """Interface: ``forward(text_UD, image_UD, has_text_U, has_image_U, text_tokens=None, text_mask=None,
    image_tokens=None) -> items_UD``; subclasses implement ``fuse(Modalities)``. ``per_modality_scores`` tells the
    model to score users against the modalities separately with ``score(...)`` (:class:`ScoreFusion`) instead of a
    dot product with ``items_UD``."""

    per_modality_scores = False

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(
        self,
        text_UD: torch.Tensor | None,
        image_UD: torch.Tensor | None,
        has_text_U: torch.Tensor,
        has_image_U: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = Modalities(text_UD, image_UD, has_text_U.bool(), has_image_U.bool(), text_tokens, text_mask, image_tokens)
        return self.fuse(x)

    def fuse(self, x: Modalities) -> torch.Tensor:
        raise NotImplementedError


class SumFusion(Fusion):
    """Masked sum of the available modality embeddings (an item with one modality gets that embedding)."""

    def fuse(self, x: Modalities) -> torch.Tensor:
        return x.text() + x.image()


class ConcatFusion(Fusion):
    """Linear over [text; image], a learned "missing" embedding standing in for an absent modality."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.missing_text = nn.Parameter(torch.zeros(dim))
        self.missing_image = nn.Parameter(torch.zeros(dim))
        self.out = nn.Linear(2 * dim, dim)

    def fuse(self, x: Modalities) -> torch.Tensor:
        ref_UD = x.reference()
        # torch.where, so the missing embeddings get (zero) gradients every step: no unused parameters under ZeRO
        text_UD = torch.where(x.has_text_U[:, None], x.text(), self.missing_text.to(ref_UD.dtype))
        image_UD = torch.where(x.has_image_U[:, None], x.image(), self.missing_image.to(ref_UD.dtype))
        return self.out(torch.cat([text_UD, image_UD], dim=-1))


class GatedFusion(Fusion):
    """g * text + (1 - g) * image with a per-dimension gate g = sigmoid(W [text; image]) when both exist; the
    available modality alone otherwise."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.gate = nn.Linear(2 * dim, dim)

    def fuse(self, x: Modalities) -> torch.Tensor:
        text_UD, image_UD = x.text(), x.image()
        gate_UD = torch.sigmoid(self.gate(torch.cat([text_UD, image_UD], dim=-1)))
        both_U1 = (x.has_text_U & x.has_image_U)[:, None]
        gate_UD = torch.where(both_U1, gate_UD, x.has_text_U[:, None].to(gate_UD.dtype))
        return gate_UD * text_UD + (1 - gate_UD) * image_UD


class ScoreFusion(SumFusion):
    """MISSRec adaptive matching: users are scored against each modality and the scores fused with a learnable
    temperature, s = tau * log((exp(s_text / tau) + exp(s_image / tau)) / 2), between the mean (large tau) and the
    max (small tau). ``forward`` gives the masked sum, the item token fed to the sequence model."""

    per_modality_scores = True

    def __init__(self, dim: int, tau: float = 1.0) -> None:
        super().__init__(dim)
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        # shape (1,), not 0-dim: DeepSpeed's parameter broadcast views every parameter as bytes, which a 0-dim
        # tensor refuses ("self.dim() cannot be 0 to view Float as Byte")
        self.log_tau = nn.Parameter(torch.tensor([math.log(tau)]))

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.exp()

    def score(
        self,
        user_BD: torch.Tensor,
        text_UD: torch.Tensor,
        image_UD: torch.Tensor,
        has_text_U: torch.Tensor,
        has_image_U: torch.Tensor,
    ) -> torch.Tensor:
        """(B, U) fused scores; an item with one modality gets that modality's score, one with none gets 0."""
        has_text_U, has_image_U = has_text_U.bool(), has_image_U.bool()
        text_BU = user_BD @ _masked(text_UD, has_text_U, text_UD).T
        image_BU = user_BD @ _masked(image_UD, has_image_U, image_UD).T
        tau = self.tau.to(text_BU.dtype)
        # (exp(a/tau) + exp(b/tau)) / 2 = exp((a+b) / 2tau) cosh((a-b) / 2tau): no cancellation at large tau
        both_BU = (text_BU + image_BU) / 2 + tau * _log_cosh((text_BU - image_BU) / (2 * tau))
        one_BU = torch.where(has_text_U, text_BU, image_BU)  # the missing one was zeroed above
        return torch.where(has_text_U & has_image_U, both_BU, one_BU)


def _log_cosh(x: torch.Tensor) -> torch.Tensor:
    """log(cosh(x)), accurate near 0 (where it is ~x^2/2) and without overflow at large |x|."""
    x = x.abs()
    small = torch.log1p(2 * torch.sinh(x.clamp(max=10.0) / 2).square())  # clamped: no inf in the unused branch
    large = x - math.log(2) + torch.log1p(torch.exp(-2 * x))
    return torch.where(x < 10.0, small, large)


class QFormerLayer(nn.Module):
    """Pre-norm: query self-attention, cross-attention to the item's tokens, feed-forward."""

    def __init__(self, dim: int, heads: int, ffn_mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout)
        self.cross_attn = Attention(dim, heads, dropout)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_mult * dim, dim)
        )

    def forward(self, q_UQD: torch.Tensor, mem_UMD: torch.Tensor, mask_UM: torch.Tensor) -> torch.Tensor:
        h_UQD = self.norm_self(q_UQD)
        q_UQD = q_UQD + self.self_attn(h_UQD)
        q_UQD = q_UQD + self.cross_attn(self.norm_cross(q_UQD), mem_UMD, mask_UM[:, None, :])
        return q_UQD + self.ffn(self.norm_ffn(q_UQD))


class QFormerFusion(Fusion):
    """EM3 Fusion-Q-Former: ``queries`` learned tokens cross-attend to the item's memory, the concatenation of
    [pooled text, text tokens, pooled image, image tokens] (padding and missing modalities masked out); the item
    embedding is the projected mean of the query outputs. Without token states, the pooled embeddings alone form
    the memory. A modality embedding gets a learned type embedding so the queries can tell them apart."""

    def __init__(self, dim: int, queries: int = 4, layers: int = 2, heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__(dim)
        self.queries = nn.Parameter(torch.randn(queries, dim) * dim**-0.5)
        self.type_embedding = nn.Parameter(torch.zeros(2, dim))
        self.layers = nn.ModuleList([QFormerLayer(dim, heads, dropout=dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)

    def fuse(self, x: Modalities) -> torch.Tensor:
        mem_UMD, mask_UM = self._memory(x)
        q_UQD = self.queries.to(mem_UMD.dtype).expand(mem_UMD.shape[0], -1, -1)
        for layer in self.layers:
            q_UQD = layer(q_UQD, mem_UMD, mask_UM)
        return self.out(self.norm(q_UQD).mean(1))

    def _memory(self, x: Modalities) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, M, D) memory tokens, zero where masked, and the (U, M) mask (True = attend)."""
        text_UXD, text_UX = self._modality(0, x.text_UD, x.text_tokens, x.text_mask, x.has_text_U, x.reference())
        image_UXD, image_UX = self._modality(1, x.image_UD, x.image_tokens, None, x.has_image_U, x.reference())
        mask_UM = torch.cat([text_UX, image_UX], dim=1)
        mem_UMD = torch.cat([text_UXD, image_UXD], dim=1)
        return torch.where(mask_UM[..., None], mem_UMD, torch.zeros((), dtype=mem_UMD.dtype)), mask_UM

    def _modality(
        self,
        kind: int,
        pooled_UD: torch.Tensor | None,
        tokens_UXD: torch.Tensor | None,
        tokens_mask_UX: torch.Tensor | None,
        has_U: torch.Tensor,
        ref_UD: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One modality's memory [pooled, tokens...] (U, X, D) and its mask (U, X); X is 0 without either."""
        U, D = ref_UD.shape
        seqs, masks = [ref_UD.new_zeros((U, 0, D))], [has_U.new_zeros((U, 0))]
        if pooled_UD is not None:
            seqs.append(pooled_UD[:, None])
            masks.append(has_U.new_ones((U, 1)))
        if tokens_UXD is not None:
            seqs.append(tokens_UXD)
            masks.append(has_U.new_ones(tokens_UXD.shape[:2]) if tokens_mask_UX is None else tokens_mask_UX.bool())
        seq_UXD = torch.cat(seqs, dim=1) + self.type_embedding[kind].to(ref_UD.dtype)
        return seq_UXD, torch.cat(masks, dim=1) & has_U[:, None]


_KINDS: dict[str, type[Fusion]] = {
    "sum": SumFusion,
    "concat": ConcatFusion,
    "gated": GatedFusion,
    "score": ScoreFusion,
    "qformer": QFormerFusion,
}


def build_fusion(kind: FusionKind, dim: int, **kwargs: float | int) -> Fusion:
    """The fusion module ``kind`` over ``dim``-sized embeddings; ``kwargs`` go to its constructor
    (score: ``tau``; qformer: ``queries``, ``layers``, ``heads``, ``dropout``)."""
    if kind not in _KINDS:
        raise ValueError(f"fusion must be one of {sorted(_KINDS)}, got {kind!r}")
    return _KINDS[kind](dim, **kwargs)
