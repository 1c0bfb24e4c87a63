"""Keeping the content prior (issue 14): the history readout starts as "the user is its last item", the user's own
items are not negatives (model.seen_before, exclude_NU), and training on a planted content signal keeps it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.losses import false_negative_mask, sampled_softmax
from pretrain.model import seen_before
from pretrain.user import UserEncoder, user_states


def test_history_readout_starts_as_the_last_item() -> None:
    torch.manual_seed(0)
    enc = UserEncoder(16, layers=2, heads=2, dropout=0.0, max_seq_len=6, readout="history")
    items_BLD = torch.randn(3, 6, 16)
    mask_BL = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    states_BLD = enc(items_BLD, mask_BL)
    assert torch.equal(user_states(states_BLD, mask_BL)[:2], items_BLD[[0, 1], [3, 5]])
    assert torch.isfinite(states_BLD).all() and not states_BLD[2].any()  # a fully padded row: zeros
    enc.history.gate.data.fill_(1.0)  # the learned mix: still finite, still a mix of the row's own items
    states_BLD = enc(items_BLD, mask_BL)
    assert torch.isfinite(states_BLD).all() and not states_BLD[2].any()
    states_BLD.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


def test_seen_before_marks_the_items_up_to_each_prediction_point() -> None:
    seq_BL = torch.tensor([[0, 2, 1, -1], [3, 0, 3, 4]])
    mask_BL = seq_BL >= 0
    b_K, t_K = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 2])
    seen_KU = seen_before(seq_BL, mask_BL, b_K, t_K, n_rows=5)
    expected = [[1, 0, 0, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 1, 0], [1, 0, 0, 1, 0]]
    assert seen_KU.tolist() == [[bool(x) for x in row] for row in expected]


def test_excluded_rows_reach_every_gathered_copy() -> None:
    # rank 1 of two: local ids [7, 3, 5]; the gathered table holds rank 0's [3, 9, -1] first
    ids_U, ids_G = torch.tensor([7, 3, 5]), torch.tensor([3, 9, -1, 7, 3, 5])
    exclude_NU = torch.tensor([[False, True, False], [True, True, False]])
    target_N = torch.tensor([5, 4])  # gathered columns of local rows 2 and 1 (item 3, excluded: kept as target)
    drop_NG = false_negative_mask(target_N, 6, item_ids_G=ids_G, exclude_NU=exclude_NU, item_ids_U=ids_U)
    assert drop_NG.tolist() == [[True, False, True, False, True, False], [True, False, True, True, False, False]]


def _chains(n_clusters: int, per_cluster: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Item "content": unit vectors around n_clusters random centres (items of a cluster are content-similar)."""
    centres_CD = F.normalize(torch.randn(n_clusters, 1, dim, generator=generator), dim=-1)
    return F.normalize(centres_CD + 0.3 * torch.randn(n_clusters, per_cluster, dim, generator=generator), dim=-1)


def _hit_rate(enc: UserEncoder, items_UD: torch.Tensor, seq_BL: torch.Tensor, k: int = 5) -> float:
    """HR@k of each sequence's last item from the rest, earlier items masked (the evaluation's protocol)."""
    history_BL, target_B = seq_BL[:, :-1], seq_BL[:, -1]
    with torch.no_grad():
        user_BD = user_states(enc(items_UD[history_BL], torch.ones_like(history_BL, dtype=torch.bool)),
                              torch.ones_like(history_BL, dtype=torch.bool))  # fmt: skip
        scores_BU = F.normalize(user_BD, dim=-1) @ items_UD.T
        scores_BU.scatter_(1, history_BL, -torch.inf)
        rank_B = (scores_BU > scores_BU.gather(1, target_B[:, None])).sum(1)
    return float((rank_B < k).float().mean())


def test_training_keeps_a_planted_content_signal() -> None:
    """Users buy within one content cluster; items carry the content. Trained on a source catalog, the history
    readout must still rank a fresh target catalog (new items, new clusters) at least as well as untrained: the
    prior survives training. (Measured on this fixture: history 0.71 -> 0.80 HR@5 on the target; the 'state'
    readout 0.72 -> 0.47, and 0.29 without exclude_NU, while reaching 1.0 on the source: issue 14's failure.)"""
    g = torch.Generator().manual_seed(0)
    n_clusters, per_cluster, D, B, L = 8, 6, 16, 32, 6
    source_UD = _chains(n_clusters, per_cluster, D, g).reshape(-1, D)
    target_UD = _chains(n_clusters, per_cluster, D, g).reshape(-1, D)

    def sequences(n: int) -> torch.Tensor:
        cluster_B = torch.randint(0, n_clusters, (n,), generator=g)
        picks_BL = torch.stack([torch.randperm(per_cluster, generator=g)[:L] for _ in range(n)])
        return cluster_B[:, None] * per_cluster + picks_BL

    torch.manual_seed(0)
    enc = UserEncoder(D, layers=2, heads=2, dropout=0.0, max_seq_len=L, readout="history")
    test_BL = sequences(256)
    start = _hit_rate(enc, target_UD, test_BL)
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-3)
    mask_BL = torch.ones(B, L, dtype=torch.bool)
    for _ in range(200):
        seq_BL = sequences(B)
        rows_U, table_BL = torch.unique(seq_BL, return_inverse=True)
        states_BLD = enc(source_UD[seq_BL], mask_BL)
        b_K, t_K = torch.nonzero(mask_BL[:, 1:], as_tuple=True)
        seen_KU = seen_before(table_BL, mask_BL, b_K, t_K, len(rows_U))
        loss = sampled_softmax(F.normalize(states_BLD[b_K, t_K], dim=-1), source_UD[rows_U],
                               table_BL[b_K, t_K + 1], temperature=0.07, exclude_NU=seen_KU)  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert start > 0.5, start  # the prior: the last item's cluster
    assert _hit_rate(enc, source_UD, test_BL) > start  # it learned something on the source
    assert _hit_rate(enc, target_UD, test_BL) >= start - 0.02  # and kept the prior on the new catalog
