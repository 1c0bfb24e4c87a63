"""Fusion of text and image item embeddings, with missing modalities."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pretrain.fusion import Attention, QFormerFusion, ScoreFusion, build_fusion, rows_to_items

D = 8
KINDS = ["sum", "concat", "gated", "score", "qformer"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run ~100x slower when the intra-op threads contend on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def modalities(U: int = 4, T: int = 5, P: int = 3, seed: int = 0) -> dict:
    """Items 0: both, 1: text only, 2: image only, 3: both. Missing rows hold NaN to prove they are never read."""
    gen = torch.Generator().manual_seed(seed)
    has_text_U = torch.tensor([True, True, False, True])[:U]
    has_image_U = torch.tensor([True, False, True, True])[:U]
    text_UD, image_UD = torch.randn(U, D, generator=gen), torch.randn(U, D, generator=gen)
    text_UD[~has_text_U] = float("nan")
    image_UD[~has_image_U] = float("nan")
    text_mask_UT = (torch.arange(T)[None] < torch.tensor([5, 2, 1, 3])[:U, None]).long()
    text_tokens_UTD = torch.randn(U, T, D, generator=gen) * text_mask_UT[..., None]
    image_tokens_UPD = torch.randn(U, P, D, generator=gen)
    image_tokens_UPD[~has_image_U] = float("nan")
    return {
        "text_UD": text_UD,
        "image_UD": image_UD,
        "has_text_U": has_text_U,
        "has_image_U": has_image_U,
        "text_tokens": text_tokens_UTD,
        "text_mask": text_mask_UT,
        "image_tokens": image_tokens_UPD,
    }


def fusion(kind: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_fusion(kind, D, **kw).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_shape_and_finite_with_missing_modalities(kind):
    items_UD = fusion(kind)(**modalities())
    assert items_UD.shape == (4, D) and torch.isfinite(items_UD).all()


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_are_finite_and_reach_every_parameter(kind):
    f = fusion(kind)
    m = modalities()
    for key in ("text_UD", "image_UD", "text_tokens", "image_tokens"):
        m[key] = torch.nan_to_num(m[key]).requires_grad_(True)
    f(**m).sum().backward()
    assert torch.isfinite(m["text_UD"].grad).all()
    unused = {n for n, p in f.named_parameters() if p.grad is None}
    assert unused <= ({"log_tau"} if kind == "score" else set())  # log_tau is trained through score()


@pytest.mark.parametrize("kind", ["sum", "gated", "score"])
def test_one_modality_gives_that_modality(kind):
    m = modalities()
    items_UD = fusion(kind)(**m)
    torch.testing.assert_close(items_UD[1], m["text_UD"][1])
    torch.testing.assert_close(items_UD[2], m["image_UD"][2])


def test_sum_and_gated_with_both():
    m = modalities()
    torch.testing.assert_close(fusion("sum")(**m)[0], m["text_UD"][0] + m["image_UD"][0])
    gated = fusion("gated")
    g = torch.sigmoid(gated.gate(torch.cat([m["text_UD"][0], m["image_UD"][0]])))
    torch.testing.assert_close(gated(**m)[0], g * m["text_UD"][0] + (1 - g) * m["image_UD"][0])


def test_concat_uses_the_learned_missing_embedding():
    f = fusion("concat")
    with torch.no_grad():
        f.missing_image.fill_(0.5)
    m = modalities()
    expected = f.out(torch.cat([m["text_UD"][1], torch.full((D,), 0.5)]))
    torch.testing.assert_close(f(**m)[1], expected)


def test_fusion_without_an_image_tower():
    m = modalities()
    items_UD = fusion("sum")(m["text_UD"], None, m["has_text_U"], torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(items_UD[1], m["text_UD"][1])
    assert torch.all(items_UD[2] == 0)
    with pytest.raises(ValueError, match="at least one"):
        fusion("sum")(None, None, m["has_text_U"], m["has_image_U"])


# ---- MISSRec score fusion -------------------------------------------------------------------------------------------


def score_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    user_BD, text_UD, image_UD = (torch.randn(n, D, generator=gen) for n in (3, 4, 4))
    return user_BD, text_UD, image_UD, torch.tensor([True, True, False, True]), torch.tensor([True, False, True, True])


def test_score_fusion_lies_between_mean_and_max_and_reaches_both_limits():
    user_BD, text_UD, image_UD, has_text_U, has_image_U = score_case()
    s_text_BU, s_image_BU = user_BD @ text_UD.T, user_BD @ image_UD.T
    both = [0, 3]
    mean_BU = ((s_text_BU + s_image_BU) / 2)[:, both]
    max_BU = torch.maximum(s_text_BU, s_image_BU)[:, both]
    for tau in (1e-3, 0.1, 1.0, 10.0, 1e4):
        s_BU = ScoreFusion(D, tau=tau).score(user_BD, text_UD, image_UD, has_text_U, has_image_U)
        assert s_BU.shape == (3, 4)
        assert torch.all(s_BU[:, both] >= mean_BU - 1e-4) and torch.all(s_BU[:, both] <= max_BU + 1e-4)
        torch.testing.assert_close(s_BU[:, 1], s_text_BU[:, 1])  # text only
        torch.testing.assert_close(s_BU[:, 2], s_image_BU[:, 2])  # image only
    s_small = ScoreFusion(D, tau=1e-3).score(user_BD, text_UD, image_UD, has_text_U, has_image_U)
    s_large = ScoreFusion(D, tau=1e4).score(user_BD, text_UD, image_UD, has_text_U, has_image_U)
    torch.testing.assert_close(s_small[:, both], max_BU, atol=1e-3 * math.log(2) + 1e-5, rtol=0)
    torch.testing.assert_close(s_large[:, both], mean_BU, atol=1e-3, rtol=0)


def test_score_fusion_tau_is_positive_and_learnable():
    f = ScoreFusion(D, tau=0.5)
    torch.testing.assert_close(f.tau, torch.tensor([0.5]))  # shape (1,): DeepSpeed refuses 0-dim parameters
    user_BD, text_UD, image_UD, has_text_U, has_image_U = score_case()
    image_UD = image_UD.clone()
    image_UD[1] = float("nan")  # missing: never read
    s_BU = f.score(user_BD, text_UD, image_UD, has_text_U, has_image_U)
    assert torch.isfinite(s_BU).all()
    s_BU.sum().backward()
    assert f.log_tau.grad is not None and f.log_tau.grad != 0
    assert f.per_modality_scores and not build_fusion("sum", D).per_modality_scores
    for tau in (1e-4, 1e4):  # extreme temperatures: finite gradients for the users and for tau
        user_BD.grad = None
        f = ScoreFusion(D, tau=tau)
        f.score(user_BD.requires_grad_(True) * 100, text_UD, image_UD, has_text_U, has_image_U).sum().backward()
        assert torch.isfinite(user_BD.grad).all() and torch.isfinite(f.log_tau.grad)


# ---- Q-Former -------------------------------------------------------------------------------------------------------


def test_qformer_masks_padding_and_missing_modalities():
    f = fusion("qformer", queries=3, layers=2, heads=2)
    m = modalities()
    out = f(**m)
    changed = {k: v.clone() for k, v in m.items()}
    changed["text_tokens"][1, 2:] = 7.0  # padding of item 1
    changed["text_tokens"][2] = -3.0  # item 2 has no text
    changed["text_UD"][2] = 9.0
    changed["image_tokens"][1] = 5.0  # item 1 has no image
    changed["image_UD"][1] = 4.0
    torch.testing.assert_close(f(**changed), out)
    changed["text_tokens"][1, 1] += 1.0  # a real token
    assert not torch.allclose(f(**changed)[1], out[1])
    torch.testing.assert_close(f(**changed)[[0, 2, 3]], out[[0, 2, 3]])  # items do not see each other


def test_qformer_item_without_any_modality_and_without_tokens():
    f = fusion("qformer")
    m = modalities()
    m["has_text_U"] = torch.tensor([True, False, False, True])
    m["has_image_U"] = torch.tensor([True, False, True, True])
    m["text_UD"][1] = float("nan")
    assert torch.isfinite(f(**m)).all()
    pooled_only = f(m["text_UD"], m["image_UD"], m["has_text_U"], m["has_image_U"])
    assert pooled_only.shape == (4, D) and torch.isfinite(pooled_only).all()


def test_qformer_attention_is_explicit_linears():
    f = QFormerFusion(D, heads=2)
    assert not any(isinstance(mod, nn.MultiheadAttention) for mod in f.modules())
    attn = f.layers[0].cross_attn
    assert isinstance(attn, Attention) and all(
        isinstance(getattr(attn, n), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")
    )


# ---- helpers --------------------------------------------------------------------------------------------------------


def test_rows_to_items_spreads_image_rows():
    x_ND = torch.arange(6.0).reshape(2, 3).requires_grad_(True)
    image_row_U = torch.tensor([1, -1, 0])
    out = rows_to_items(x_ND, image_row_U)
    assert out.tolist() == [[3.0, 4.0, 5.0], [0.0, 0.0, 0.0], [0.0, 1.0, 2.0]]
    out.sum().backward()
    assert x_ND.grad.tolist() == [[1.0] * 3] * 2
    assert rows_to_items(torch.zeros(0, 2, 3), torch.tensor([-1, -1])).shape == (2, 2, 3)


def test_build_fusion_rejects_unknown_kind():
    with pytest.raises(ValueError, match="fusion"):
        build_fusion("mlp", D)
    assert build_fusion("qformer", D, queries=2).queries.shape == (2, D)
