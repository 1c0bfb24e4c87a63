"""Every loss against a value computed by hand from its formula on a tiny case."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.losses import (
    combine,
    content_id_infonce,
    cpc_bce,
    false_negative_mask,
    interest_diversity,
    log_q_from_popularity,
    next_item_ce,
    position_counts,
    sampled_softmax,
    sampled_softmax_logits,
    seq_seq_infonce,
)

e = math.e


def _ce(logits: list[float], target: int) -> float:
    return math.log(sum(math.exp(z) for z in logits)) - logits[target]


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# 2 users x 3 items; logits at temperature 0.5: user0 [2, 0, 2], user1 [0, 2, 4]
USERS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
ITEMS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 2.0]])
TARGET = torch.tensor([0, 1])


def test_sampled_softmax_by_hand() -> None:
    loss = sampled_softmax(USERS, ITEMS, TARGET, temperature=0.5)
    expected = ((math.log(2 * e**2 + 1) - 2) + (math.log(1 + e**2 + e**4) - 2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_log_q_shifts_logits_by_minus_log_q() -> None:
    log_q_U = log_q_from_popularity(torch.tensor([2, 1, 0]))  # floored: [2, 1, 1] / 4
    torch.testing.assert_close(log_q_U, torch.tensor([0.5, 0.25, 0.25]).log())
    plain = sampled_softmax_logits(USERS, ITEMS, temperature=0.5)
    corrected = sampled_softmax_logits(USERS, ITEMS, temperature=0.5, log_q_G=log_q_U)
    assert torch.equal(corrected, plain - log_q_U)
    loss = sampled_softmax(USERS, ITEMS, TARGET, temperature=0.5, log_q_U=log_q_U)
    log_q = [math.log(0.5), math.log(0.25), math.log(0.25)]
    rows = [[z - lq for z, lq in zip(logits, log_q)] for logits in ([2, 0, 2], [0, 2, 4])]
    assert loss.item() == pytest.approx((_ce(rows[0], 0) + _ce(rows[1], 1)) / 2, rel=1e-6)
    # the shared total only moves every column alike: the loss does not change
    shifted = log_q_from_popularity(torch.tensor([2, 1, 0]), total=1000.0)
    assert sampled_softmax(USERS, ITEMS, TARGET, temperature=0.5, log_q_U=shifted).item() == pytest.approx(loss.item())


def test_position_counts() -> None:
    seq_BL = torch.tensor([[0, 2, 2], [1, -1, -1]])
    assert position_counts(seq_BL, seq_BL >= 0, 4).tolist() == [1, 1, 2, 0]


def test_exclude_equals_deleting_the_column_and_never_drops_the_target() -> None:
    exclude_NG = torch.tensor([[False, False, True], [False, True, False]])  # user1's target: ignored
    loss = sampled_softmax(USERS, ITEMS, TARGET, temperature=0.5, exclude_NG=exclude_NG)
    expected = ((math.log(e**2 + 1) - 2) + (math.log(1 + e**2 + e**4) - 2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    kept = sampled_softmax(USERS[:1], ITEMS[:2], TARGET[:1], temperature=0.5)
    only_user0 = sampled_softmax(USERS[:1], ITEMS, TARGET[:1], temperature=0.5, exclude_NG=exclude_NG[:1])
    assert only_user0.item() == pytest.approx(kept.item(), rel=1e-6)


def _two_rank_gather(rank: int, tables: list[torch.Tensor], ids: list[torch.Tensor]):
    """A stand-in for all_gather + cat over 2 ranks: the local tensor in its rank's slot, the other rank's beside."""

    def gather(x: torch.Tensor) -> torch.Tensor:
        parts = tables if x.is_floating_point() else ids
        return torch.cat([x if r == rank else parts[r] for r in range(2)])

    return gather


@pytest.mark.parametrize("rank", [0, 1])
def test_gather_hook_masks_copies_of_the_target_and_padding(rank: int) -> None:
    # two ranks' tables, padded to U = 3: rank 0 holds items (10, 11, 12), rank 1 holds (12, 13, padding)
    tables = [ITEMS, torch.tensor([[1.0, 2.0], [3.0, 0.0], [7.0, 7.0]])]
    ids = [torch.tensor([10, 11, 12]), torch.tensor([12, 13, -1])]
    local_items = tables[rank].clone().requires_grad_()
    # both users target item 12: local row 2 on rank 0, local row 0 on rank 1, plus the offset rank * U
    target_N = torch.tensor([2, 2]) if rank == 0 else torch.tensor([0, 0]) + 1 * 3
    gather = _two_rank_gather(rank, tables, ids)
    loss = sampled_softmax(USERS, local_items, target_N, temperature=0.5, item_ids_U=ids[rank], gather=gather)
    # the candidates are the distinct items 10, 11, 12, 13; logits at temperature 0.5
    user0, user1 = [2.0, 0.0, 2.0, 6.0], [0.0, 2.0, 4.0, 0.0]
    assert loss.item() == pytest.approx((_ce(user0, 2) + _ce(user1, 2)) / 2, rel=1e-6)
    loss.backward()
    assert local_items.grad.abs().sum() > 0


def test_false_negative_mask() -> None:
    ids_G = torch.tensor([5, 6, 5, -1])
    drop = false_negative_mask(torch.tensor([0, 1]), 4, item_ids_G=ids_G)
    assert drop.tolist() == [[False, False, True, True], [False, False, False, True]]


def test_cpc_bce_by_hand() -> None:
    user_BD = torch.tensor([[1.0, 0.0]])
    suffix_BSD = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [float("nan"), 5.0]]])  # third: padding
    suffix_mask_BS = torch.tensor([[True, True, False]])
    negatives_BJD = torch.tensor([[[-1.0, 0.0], [0.0, 3.0]]])
    loss = cpc_bce(user_BD, suffix_BSD, suffix_mask_BS, negatives_BJD)
    r_pos, r_neg = [2.0, 0.0], [-1.0, 0.0]
    expected = -sum(math.log(_sigmoid(r)) for r in r_pos) / 2 - sum(math.log(1 - _sigmoid(r)) for r in r_neg) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    dropped = cpc_bce(user_BD, suffix_BSD, suffix_mask_BS, negatives_BJD, torch.tensor([[True, False]]))
    expected = -sum(math.log(_sigmoid(r)) for r in r_pos) / 2 - math.log(1 - _sigmoid(-1.0))
    assert dropped.item() == pytest.approx(expected, rel=1e-6)


def test_next_item_ce_by_hand() -> None:
    states_BLD = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]], [[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]])
    items_UD = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    seq_BL = torch.tensor([[2, 0, -1], [0, 1, 2]])
    loss = next_item_ce(states_BLD, items_UD, seq_BL, seq_BL >= 0)
    # pairs: (seq0 t0 -> item 0), (seq1 t0 -> item 1), (seq1 t1 -> item 2); padded target of seq0 t1 ignored
    expected = (_ce([1, 0, 1], 0) + _ce([0, 1, 1], 1) + _ce([2, 0, 2], 2)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_content_id_infonce_by_hand() -> None:
    content_UD = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    id_UD = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # cosines: [[1, r], [0, r]], r = 1/sqrt(2)
    r = 1 / math.sqrt(2)
    z = [[1 / 0.5, r / 0.5], [0.0, r / 0.5]]
    rows = _ce(z[0], 0) + _ce(z[1], 1)
    cols = _ce([z[0][0], z[1][0]], 0) + _ce([z[0][1], z[1][1]], 1)
    expected = (rows / 2 + cols / 2) / 2
    assert content_id_infonce(content_UD, id_UD, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_seq_seq_infonce_by_hand_and_symmetric() -> None:
    g = torch.Generator().manual_seed(0)
    v1, v2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    cos = [[(v1[i] @ v2[j] / v1[i].norm() / v2[j].norm()).item() / 0.1 for j in range(3)] for i in range(3)]
    a_to_b = sum(_ce(cos[i], i) for i in range(3)) / 3
    b_to_a = sum(_ce([cos[j][i] for j in range(3)], i) for i in range(3)) / 3
    loss = seq_seq_infonce(v1, v2, 0.1)
    assert loss.item() == pytest.approx((a_to_b + b_to_a) / 2, rel=1e-5)
    assert seq_seq_infonce(v2, v1, 0.1).item() == pytest.approx(loss.item(), rel=1e-6)


def test_interest_diversity_by_hand() -> None:
    memory_BMD = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]], [[2.0, 0.0], [5.0, 5.0], [5.0, 5.0]]])
    mask_BM = torch.tensor([[True, True, False], [True, False, False]])
    # pooled: [0.5, 0.5] -> 0.5 / 2; [2, 0] -> 4 / 2
    assert interest_diversity(memory_BMD, mask_BM).item() == pytest.approx((0.25 + 2.0) / 2)


def test_combine_skips_zero_weights_and_checks_names() -> None:
    a = torch.tensor(2.0, requires_grad=True)
    losses = {"a": a, "b": torch.tensor(3.0), "c": torch.tensor(float("nan"))}
    total, logs = combine(losses, {"a": 1.0, "b": 0.5, "c": 0.0})
    assert total.item() == 3.5 and logs == {"a": 2.0, "b": 3.0, "total": 3.5}
    total.backward()
    assert a.grad.item() == 1.0
    with pytest.raises(ValueError, match="without a weight"):
        combine(losses, {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="not computed"):
        combine({"a": a}, {"a": 1.0, "d": 0.1})
    with pytest.raises(ValueError, match="weight 0"):
        combine({"a": a}, {"a": 0.0})
