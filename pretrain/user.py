"""The user (sequence) encoder: a causal Transformer over item embeddings (SASRec / TransRec), optionally
cross-attending to a sequence's interest tokens (MISSRec).

Attention is written with explicit ``nn.Linear`` q/k/v/o projections (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj``) so LoRA can target them under ZeRO-3 (LoRA on ``nn.MultiheadAttention`` breaks there).

Shape legend::

    B  sequences            L  sequence positions (<= max_seq_len)     D  width
    M  memory (interest) tokens of a sequence                          H  heads     K  head width (D / H)
    Q  attention queries    C  attention keys/values (context)

Boolean masks are True where something is real / may be attended to.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Readout = Literal["state", "history"]


class Attention(nn.Module):
    """Multi-head attention with explicit q/k/v/o projections: self-attention, or cross-attention to ``context``."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.o_proj = nn.Linear(width, width)

    def forward(
        self, x_BQD: torch.Tensor, context_BCD: torch.Tensor | None = None, allowed_BQC: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend from ``x`` to ``context`` (``x`` itself when None). ``allowed_BQC`` (bool, broadcastable to
        (B, Q, C)) says which keys each query may see; a query that may see none gets a zero output, not NaN."""
        context_BCD = x_BQD if context_BCD is None else context_BCD
        q_BHQK, k_BHCK, v_BHCK = (
            self._heads(self.q_proj(x_BQD)),
            self._heads(self.k_proj(context_BCD)),
            self._heads(self.v_proj(context_BCD)),
        )
        any_BQ1 = None
        if allowed_BQC is not None:
            any_BQ1 = allowed_BQC.any(-1, keepdim=True)
            # a fully masked row makes SDPA's softmax 0/0 = NaN: let it see everything, then zero its output
            allowed_BQC = allowed_BQC | ~any_BQ1
            allowed_BQC = allowed_BQC.unsqueeze(-3)  # head axis
        out_BHQK = F.scaled_dot_product_attention(
            q_BHQK, k_BHCK, v_BHCK, attn_mask=allowed_BQC, dropout_p=self.dropout if self.training else 0.0
        )
        B, H, Q, K = out_BHQK.shape
        out_BQD = out_BHQK.transpose(1, 2).reshape(B, Q, H * K)
        if any_BQ1 is not None:
            out_BQD = torch.where(any_BQ1, out_BQD, 0.0)
        return self.o_proj(out_BQD)

    def _heads(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        return x_BTD.view(B, T, self.heads, D // self.heads).transpose(1, 2)


class Block(nn.Module):
    """Pre-LN Transformer block: self-attention, optional cross-attention to a memory, then a GELU FFN (4x)."""

    def __init__(self, width: int, heads: int, dropout: float, cross_attention: bool = False) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.cross_norm = nn.LayerNorm(width) if cross_attention else None
        self.cross_attn = Attention(width, heads, dropout) if cross_attention else None
        self.ffn_norm = nn.LayerNorm(width)
        self.ffn_in = nn.Linear(width, 4 * width)
        self.ffn_out = nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x_BLD: torch.Tensor,
        allowed_BLL: torch.Tensor | None,
        memory_BMD: torch.Tensor | None = None,
        allowed_BLM: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x_BLD = x_BLD + self.drop(self.attn(self.attn_norm(x_BLD), allowed_BQC=allowed_BLL))
        if memory_BMD is not None:
            if self.cross_attn is None:
                raise ValueError("memory given to a block built without cross-attention")
            x_BLD = x_BLD + self.drop(self.cross_attn(self.cross_norm(x_BLD), memory_BMD, allowed_BLM))
        hidden = F.gelu(self.ffn_in(self.ffn_norm(x_BLD)))
        return x_BLD + self.drop(self.ffn_out(self.drop(hidden)))


class HistoryReadout(nn.Module):
    """The user as a mix of its own items: z_t + g * (sum_s a_ts z_s - z_t), the attention a_t over the items
    z_s at positions s <= t scored from the Transformer's state h_t, g a learned scalar starting at 0 (ReZero). At
    initialisation the user is its last item (content similarity); Adam moves g by about lr per step."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        # shape (1,), not 0-dim: DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, states_BLD: torch.Tensor, items_BLD: torch.Tensor, allowed_BLL: torch.Tensor) -> torch.Tensor:
        D = items_BLD.shape[-1]
        logits_BLL = self.query(states_BLD) @ self.key(items_BLD).transpose(1, 2) / D**0.5
        # a query that may see nothing (a fully padded row) would give 0/0: it sees everything (zero items instead)
        allowed_BLL = allowed_BLL | ~allowed_BLL.any(-1, keepdim=True)
        weights_BLL = logits_BLL.masked_fill(~allowed_BLL, -torch.inf).softmax(-1)
        return items_BLD + self.gate * (weights_BLL @ items_BLD - items_BLD)


class UserEncoder(nn.Module):
    """Causal Transformer over a sequence's item embeddings plus learned positions (S = Z + P).

    Position t sees the real positions <= t. Sequences are right-padded: padded positions never influence
    real ones, and their own outputs are finite (a fully padded row gives finite states too).

    With ``n_interest_tokens`` > 0 (MISSRec: the number P of interest prototypes of the catalog; only its
    being positive matters here), the encoder also has an interest encoder (``layers`` bidirectional blocks
    over the memory tokens, no positions: they are a set) and every block cross-attends to its output.

    ``readout="history"``: the states are :class:`HistoryReadout`'s mixes of the sequence's own items instead of
    the final norm's output (the Transformer then only weighs the history).
    """

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        dropout: float,
        max_seq_len: int,
        n_interest_tokens: int = 0,
        readout: Readout = "state",
    ) -> None:
        super().__init__()
        if layers < 1 or max_seq_len < 1 or n_interest_tokens < 0:
            raise ValueError(
                f"need layers >= 1, max_seq_len >= 1, n_interest_tokens >= 0; got {layers}, {max_seq_len}, "
                f"{n_interest_tokens}"
            )
        self.max_seq_len = max_seq_len
        interests = n_interest_tokens > 0
        self.position = nn.Embedding(max_seq_len, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout, cross_attention=interests) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.interest_blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers)) if interests else None
        self.interest_norm = nn.LayerNorm(width) if interests else None
        self.apply(_init_weights)
        if readout not in ("state", "history"):
            raise ValueError(f"readout must be 'state' or 'history', got {readout!r}")
        self.history = HistoryReadout(width) if readout == "history" else None

    def forward(
        self,
        items_BLD: torch.Tensor,
        mask_BL: torch.Tensor,
        memory_BMD: torch.Tensor | None = None,
        memory_mask_BM: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """States (B, L, D) of the sequences; with ``memory_BMD`` (the raw interest tokens of each sequence,
        ``memory_mask_BM`` True at real ones), the blocks also attend to the encoded interests."""
        B, L, D = items_BLD.shape
        if L > self.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds max_seq_len {self.max_seq_len}")
        # padded embeddings are zeroed so that garbage there (even NaN) cannot leak through 0-weight attention
        # the embedding is called, not indexed: ZeRO-3 gathers a module's parameters in its forward hook
        positions_L = torch.arange(L, device=items_BLD.device)
        x_BLD = torch.where(mask_BL[..., None], items_BLD, 0.0) + self.position(positions_L)
        x_BLD = self.drop(x_BLD)
        causal_LL = torch.ones(L, L, dtype=torch.bool, device=mask_BL.device).tril()
        allowed_BLL = causal_LL & mask_BL[:, None, :]
        allowed_BLM = None
        if memory_BMD is not None:
            memory_BMD = self.encode_interests(memory_BMD, memory_mask_BM)
            if memory_mask_BM is not None:
                allowed_BLM = memory_mask_BM[:, None, :]
        for block in self.blocks:
            x_BLD = block(x_BLD, allowed_BLL, memory_BMD, allowed_BLM)
        if self.history is not None:
            return self.history(self.norm(x_BLD), torch.where(mask_BL[..., None], items_BLD, 0.0), allowed_BLL)
        return self.norm(x_BLD)

    def encode_interests(self, memory_BMD: torch.Tensor, memory_mask_BM: torch.Tensor | None = None) -> torch.Tensor:
        """The interest encoder (MISSRec): bidirectional self-attention among a sequence's real interest tokens."""
        if self.interest_blocks is None:
            raise ValueError("interest memory given to a UserEncoder built with n_interest_tokens=0")
        allowed_BMM = None if memory_mask_BM is None else memory_mask_BM[:, None, :]
        if memory_mask_BM is not None:
            memory_BMD = torch.where(memory_mask_BM[..., None], memory_BMD, 0.0)
        x_BMD = self.drop(memory_BMD)
        for block in self.interest_blocks:
            x_BMD = block(x_BMD, allowed_BMM)
        return self.interest_norm(x_BMD)


def user_states(states_BLD: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """(B, D) state at the last real position of each sequence (position 0 for a fully padded row)."""
    L = mask_BL.shape[1]
    positions_L = torch.arange(L, device=mask_BL.device)
    last_B = torch.where(mask_BL, positions_L, 0).amax(dim=1)
    return states_BLD[torch.arange(states_BLD.shape[0], device=states_BLD.device), last_B]


def _init_weights(module: nn.Module) -> None:
    # BERT / SASRec initialisation (TransRec re-initialises its user encoder the same way)
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
