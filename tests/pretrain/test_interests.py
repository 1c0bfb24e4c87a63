"""DPC-KNN interest discovery and per-sequence interest tokens."""

from __future__ import annotations

import pytest
import torch

from pretrain.interests import centroids, dpc_knn, interest_ids, interest_memory


def _blobs(per_blob: int = 40, D: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centers_3D = torch.zeros(3, D)
    centers_3D[0, 0], centers_3D[1, 1], centers_3D[2, 2] = 20.0, 20.0, 20.0
    blob_N = torch.arange(3).repeat_interleave(per_blob)
    points_ND = centers_3D[blob_N] + torch.randn(3 * per_blob, D, generator=g)
    perm_N = torch.randperm(3 * per_blob, generator=g)  # blobs interleaved in the catalog order
    return points_ND[perm_N], blob_N[perm_N]


def test_three_blobs_one_prototype_each_and_every_point_to_its_blob() -> None:
    points_ND, blob_N = _blobs()
    prototype_idx_P, assignment_N = dpc_knn(points_ND, n_prototypes=3, k=5)
    assert sorted(blob_N[prototype_idx_P].tolist()) == [0, 1, 2]
    assert torch.equal(assignment_N, torch.argsort(blob_N[prototype_idx_P])[blob_N])
    assert torch.equal(assignment_N[prototype_idx_P], torch.arange(3))


def test_chunked_equals_unchunked() -> None:
    points_ND, _ = _blobs(per_blob=30)
    whole = dpc_knn(points_ND, n_prototypes=6, k=4, chunk_size=10_000)
    for chunk_size in (1, 7, 32):
        chunked = dpc_knn(points_ND, n_prototypes=6, k=4, chunk_size=chunk_size)
        assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])


def _reference_dpc_knn(x_ND: torch.Tensor, P: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The direct N x N formula: rho * delta, self excluded from the neighbours, ties to the lower index."""
    N, D = x_ND.shape
    d_NN = torch.cdist(x_ND, x_ND, compute_mode="donot_use_mm_for_euclid_dist") / D**0.5
    others_NN = d_NN.clone().fill_diagonal_(float("inf"))
    rho_N = torch.exp(-others_NN.topk(k, largest=False).values.square().mean(1))
    delta_N = torch.empty(N)
    for i in range(N):
        denser = [j for j in range(N) if rho_N[j] > rho_N[i] or (rho_N[j] == rho_N[i] and j < i)]
        delta_N[i] = d_NN[i, denser].min() if denser else d_NN[i].max()
    prototype_idx_P = torch.topk(rho_N * delta_N, P).indices
    return prototype_idx_P, d_NN[:, prototype_idx_P].argmin(1)


def test_matches_the_direct_formula() -> None:
    points_ND, _ = _blobs(per_blob=15)
    points_ND = points_ND / 4  # closer blobs: densities well above 0, so the plain product is meaningful
    prototype_idx_P, assignment_N = dpc_knn(points_ND, n_prototypes=5, k=3, chunk_size=8)
    expected_P, expected_N = _reference_dpc_knn(points_ND, 5, 3)
    assert torch.equal(prototype_idx_P, expected_P) and torch.equal(assignment_N, expected_N)


def test_bad_arguments() -> None:
    points_ND, _ = _blobs(per_blob=10)
    with pytest.raises(ValueError, match="n_prototypes"):
        dpc_knn(points_ND, n_prototypes=31, k=3)
    with pytest.raises(ValueError, match="k must"):
        dpc_knn(points_ND, n_prototypes=3, k=30)


def test_centroids() -> None:
    items_ND = torch.tensor([[0.0, 0.0], [2.0, 2.0], [5.0, 1.0]])
    assert centroids(items_ND, torch.tensor([0, 0, 1]), 3).tolist() == [[1.0, 1.0], [5.0, 1.0], [0.0, 0.0]]


def test_interest_tokens_deduplicated() -> None:
    prototype_U = torch.tensor([2, 0, 2, 1, 2])  # table rows 0, 2, 4 share interest 2
    seq_BL = torch.tensor([[0, 2, 4, 1], [3, 3, -1, -1], [-1, -1, -1, -1]])
    ids_BM, mask_BM = interest_ids(seq_BL, seq_BL >= 0, prototype_U)
    assert ids_BM.tolist() == [[0, 2], [1, -1], [-1, -1]]
    assert mask_BM.tolist() == [[True, True], [True, False], [False, False]]
    interests_PD = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    memory_BMD, memory_mask_BM = interest_memory(seq_BL, seq_BL >= 0, prototype_U, interests_PD)
    assert torch.equal(memory_mask_BM, mask_BM)
    assert memory_BMD.tolist() == [[[1.0, 0.0], [3.0, 3.0]], [[0.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]
