"""Interest discovery (MISSRec): DPC-KNN clustering of a catalog's item tokens, and per-sequence interest tokens.

DPC-KNN (density peaks with k-nearest-neighbour density), as in MISSRec's ``cluster_dpc_knn`` (from TCFormer):
distances are Euclidean divided by sqrt(D); rho_i = exp(-mean squared distance to its k nearest neighbours);
delta_i = distance to the nearest point of higher density (its largest distance for the densest point); the
``n_prototypes`` points with the largest rho * delta are the prototypes; every point joins its nearest prototype.
Differences from the reference, all deliberate: the k neighbours exclude the point itself; density ties are
broken by index (lower index counts as denser) rather than left to chance; scores are ranked in log space
(log rho + log delta), which ranks as the exact product does, even where exp(-d^2) would round to 0; and
distances are computed ``chunk_size`` rows at a time, so memory is O(chunk_size * N), never N x N.

Shape legend::

    N  catalog items (tokens)    D  token width    P  prototypes    C  rows of a chunk
    B  sequences                 L  positions      U  rows of the batch's item table    M  interest tokens
"""

from __future__ import annotations

import math

import torch

_CHUNK_ELEMENTS = 2**25


@torch.no_grad()
def dpc_knn(
    items_ND: torch.Tensor, n_prototypes: int, k: int, *, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster ``items_ND``: returns ``prototype_idx_P`` (rows of the prototypes, best score first) and
    ``assignment_N`` (each item's prototype id in [0, P); a prototype is assigned to itself).

    ``chunk_size`` rows are compared with all N at a time; by default as many as keep a (chunk, N) float32
    temporary near 128 MiB (a few such temporaries live at once). Time is O(N^2 D) either way."""
    N, D = items_ND.shape
    chunk_size = max(1, _CHUNK_ELEMENTS // N) if chunk_size is None else chunk_size
    if not 1 <= n_prototypes <= N:
        raise ValueError(f"n_prototypes must be in [1, {N}] for {N} items, got {n_prototypes}")
    if not 1 <= k < N:
        raise ValueError(f"k must be in [1, {N - 1}] for {N} items, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    x_ND = items_ND.float() / math.sqrt(D)  # distances of the scaled points are the distances / sqrt(D)
    log_rho_N = _log_density(x_ND, k, chunk_size)
    # rank 0 = densest; the stable sort breaks density ties by index
    rank_N = torch.empty(N, dtype=torch.long, device=x_ND.device)
    rank_N[torch.sort(-log_rho_N, stable=True).indices] = torch.arange(N, device=x_ND.device)
    delta_N = _delta(x_ND, rank_N, chunk_size)
    score_N = log_rho_N + delta_N.log()
    prototype_idx_P = torch.topk(score_N, n_prototypes).indices
    assignment_N = _nearest(x_ND, x_ND[prototype_idx_P], chunk_size)
    assignment_N[prototype_idx_P] = torch.arange(n_prototypes, device=x_ND.device)
    return prototype_idx_P, assignment_N


def _chunks(N: int, chunk_size: int) -> range:
    return range(0, N, chunk_size)


def _sq_dist(a_CD: torch.Tensor, b_ND: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a_CD, b_ND).square()


def _log_density(x_ND: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    N = x_ND.shape[0]
    log_rho_N = torch.empty(N, device=x_ND.device)
    for start in _chunks(N, chunk_size):
        d2_CN = _sq_dist(x_ND[start : start + chunk_size], x_ND)
        rows_C = torch.arange(d2_CN.shape[0], device=x_ND.device)
        d2_CN[rows_C, rows_C + start] = math.inf  # not its own neighbour
        log_rho_N[start : start + chunk_size] = -d2_CN.topk(k, largest=False).values.mean(dim=1)
    return log_rho_N


def _delta(x_ND: torch.Tensor, rank_N: torch.Tensor, chunk_size: int) -> torch.Tensor:
    N = x_ND.shape[0]
    delta_N = torch.empty(N, device=x_ND.device)
    for start in _chunks(N, chunk_size):
        d_CN = torch.cdist(x_ND[start : start + chunk_size], x_ND)
        denser_CN = rank_N[None, :] < rank_N[start : start + chunk_size, None]
        nearest_denser_C = torch.where(denser_CN, d_CN, math.inf).amin(dim=1)
        # the densest point has no denser one: it gets its largest distance
        delta_N[start : start + chunk_size] = torch.where(denser_CN.any(dim=1), nearest_denser_C, d_CN.amax(dim=1))
    return delta_N


def _nearest(x_ND: torch.Tensor, centers_PD: torch.Tensor, chunk_size: int) -> torch.Tensor:
    N = x_ND.shape[0]
    return torch.cat([torch.cdist(x_ND[s : s + chunk_size], centers_PD).argmin(dim=1) for s in _chunks(N, chunk_size)])


def centroids(items_ND: torch.Tensor, assignment_N: torch.Tensor, n_prototypes: int) -> torch.Tensor:
    """(P, D) mean of each cluster's items: MISSRec's interest embeddings (the clusters' centroids)."""
    P, D = n_prototypes, items_ND.shape[1]
    sums_PD = items_ND.new_zeros(P, D).index_add_(0, assignment_N, items_ND)
    counts_P = torch.bincount(assignment_N, minlength=P).clamp_min(1).to(items_ND.dtype)
    return sums_PD / counts_P[:, None]


def interest_ids(
    seq_BL: torch.Tensor, seq_mask_BL: torch.Tensor, prototype_U: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct interests of each sequence: ``ids_BM`` (prototype ids, ascending, left-aligned, -1 padded)
    and ``mask_BM``. ``seq_BL`` holds rows of the batch's item table, ``prototype_U`` each row's prototype id.
    Deduplication follows MISSRec: each interest counts once, however many of the sequence's items share it.
    M is the largest number of distinct interests of a sequence (at least 1)."""
    sentinel = torch.iinfo(torch.long).max
    proto_BL = torch.where(seq_mask_BL, prototype_U[seq_BL.clamp_min(0)], sentinel)
    sorted_BL = proto_BL.sort(dim=1).values
    first_BL = torch.ones_like(seq_mask_BL)
    first_BL[:, 1:] = sorted_BL[:, 1:] != sorted_BL[:, :-1]
    keep_BL = first_BL & (sorted_BL != sentinel)
    count_B = keep_BL.sum(dim=1)
    M = max(int(count_B.max()) if count_B.numel() else 0, 1)
    # move kept ids to the front, keeping their ascending order
    order_BL = torch.sort((~keep_BL).to(torch.uint8), dim=1, stable=True).indices
    ids_BM = sorted_BL.gather(1, order_BL)[:, :M]
    if ids_BM.shape[1] < M:  # L == 0
        ids_BM = torch.full((seq_BL.shape[0], M), -1, dtype=torch.long, device=seq_BL.device)
    mask_BM = torch.arange(M, device=seq_BL.device) < count_B[:, None]
    return torch.where(mask_BM, ids_BM, -1), mask_BM


def interest_memory(
    seq_BL: torch.Tensor, seq_mask_BL: torch.Tensor, prototype_U: torch.Tensor, interests_PD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interest tokens of each sequence for :class:`pretrain.user.UserEncoder`: ``memory_BMD`` (rows of
    ``interests_PD``, e.g. :func:`centroids`, zero where padded) and ``memory_mask_BM``."""
    ids_BM, mask_BM = interest_ids(seq_BL, seq_mask_BL, prototype_U)
    memory_BMD = interests_PD[ids_BM.clamp_min(0)]
    return torch.where(mask_BM[..., None], memory_BMD, 0.0), mask_BM
