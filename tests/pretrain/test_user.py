"""The user encoder: causality, padding invariance, finite padded rows, interest cross-attention."""

from __future__ import annotations

import pytest
import torch

from pretrain.user import Attention, UserEncoder, user_states

D, L = 16, 6


def _encoder(n_interest_tokens: int = 0) -> UserEncoder:
    torch.manual_seed(0)
    return UserEncoder(D, layers=2, heads=4, dropout=0.1, max_seq_len=8, n_interest_tokens=n_interest_tokens).eval()


def _items(B: int = 3, length: int = L, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, length, D, generator=torch.Generator().manual_seed(seed))


def test_causal_exactly() -> None:
    enc = _encoder()
    items_BLD, mask_BL = _items(), torch.ones(3, L, dtype=torch.bool)
    before = enc(items_BLD, mask_BL)
    for t in range(L - 1):
        changed = items_BLD.clone()
        changed[:, t + 1 :] = torch.randn(3, L - t - 1, D)
        after = enc(changed, mask_BL)
        assert torch.equal(after[:, : t + 1], before[:, : t + 1])
        assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])


def test_right_padding_invariance() -> None:
    enc = _encoder()
    items_BLD = _items(B=2)
    mask_BL = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    padded = items_BLD.clone()
    padded[0, 4:] = float("nan")  # garbage in the padding must not leak
    states = enc(padded, mask_BL)
    alone = enc(items_BLD[:1, :4], torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(states[0, :4], alone[0], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(states).all()
    torch.testing.assert_close(user_states(states, mask_BL), torch.stack([states[0, 3], states[1, 5]]))


def test_fully_padded_rows_are_finite_and_do_not_disturb_others() -> None:
    enc = _encoder()
    items_BLD = _items(B=2)
    mask_BL = torch.tensor([[False] * L, [True] * L])
    states = enc(items_BLD, mask_BL)
    assert torch.isfinite(states).all()
    torch.testing.assert_close(states[1], enc(items_BLD[1:], mask_BL[1:])[0], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(user_states(states, mask_BL)).all()


def test_gradients_finite_with_padding() -> None:
    enc = _encoder().train()
    items_BLD = _items(B=2).requires_grad_()
    mask_BL = torch.tensor([[False] * L, [True, True] + [False] * 4])
    enc(items_BLD, mask_BL).sum().backward()
    assert torch.isfinite(items_BLD.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


def test_memory_cross_attention_changes_outputs_and_respects_mask() -> None:
    enc = _encoder(n_interest_tokens=5)
    items_BLD, mask_BL = _items(B=2), torch.ones(2, L, dtype=torch.bool)
    memory_BMD = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(2))
    memory_mask_BM = torch.tensor([[True, True, False], [True, True, True]])
    with_memory = enc(items_BLD, mask_BL, memory_BMD, memory_mask_BM)
    without = enc(items_BLD, mask_BL)
    assert not torch.allclose(with_memory, without)
    changed = memory_BMD.clone()
    changed[0, 2] = torch.randn(D)  # masked token of row 0: no effect
    torch.testing.assert_close(enc(items_BLD, mask_BL, changed, memory_mask_BM), with_memory)
    changed[0, 1] = torch.randn(D)  # a real token: an effect
    assert not torch.allclose(enc(items_BLD, mask_BL, changed, memory_mask_BM)[0], with_memory[0])
    # a sequence without any interest token gets finite states
    empty = enc(items_BLD, mask_BL, memory_BMD, torch.zeros(2, 3, dtype=torch.bool))
    assert torch.isfinite(empty).all()


def test_memory_needs_interest_layers_and_length_is_checked() -> None:
    enc = _encoder()
    with pytest.raises(ValueError, match="n_interest_tokens"):
        enc(_items(), torch.ones(3, L, dtype=torch.bool), torch.randn(3, 2, D))
    with pytest.raises(ValueError, match="max_seq_len"):
        enc(_items(length=9), torch.ones(3, 9, dtype=torch.bool))


def test_attention_uses_named_linear_projections_and_masks() -> None:
    attn = Attention(D, heads=2)
    names = {n for n, m in attn.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj"}
    x_BQD, ctx_BCD = torch.randn(1, 2, D), torch.randn(1, 3, D)
    allowed_BQC = torch.tensor([[[True, False, False], [False, False, False]]])
    out = attn(x_BQD, ctx_BCD, allowed_BQC)
    # query 0 sees only key 0: its output is o_proj(v_proj(ctx[0])); query 1 sees nothing: o_proj(0)
    torch.testing.assert_close(out[0, 0], attn.o_proj(attn.v_proj(ctx_BCD[0, 0])))
    torch.testing.assert_close(out[0, 1], attn.o_proj.bias)
