"""Training objectives of TransRec, MISSRec and EM3, as plain functions of tensors.

Nothing here calls ``torch.distributed``: "negatives from all ranks" goes through the ``gather`` hook of
:func:`sampled_softmax`, which the engine supplies.

Shape legend::

    N  prediction points (users, or sequence positions)     D  embedding width
    U  rows of a rank's item table (the batch's distinct items)
    G  rows of the gathered item table (all ranks' tables concatenated; G = U without a gather hook), then any
       extra negatives (Q rows: a queue of earlier batches' items)
    B  sequences    L  positions    S  suffix positions (CPC)    J  negatives per sequence    M  interest tokens
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# ---- in-batch sampled softmax ---------------------------------------------------------------------


def log_q_from_popularity(
    popularity_U: torch.Tensor, *, total: float | None = None, floor: float = 1.0
) -> torch.Tensor:
    """log Q of each item for the logQ correction (Yi et al., RecSys 2019): log(p / total), p = popularity
    floored at ``floor`` (an item never seen in training would give log 0).

    ``popularity_U`` is the manifest's ``popularity`` (training interactions) of the batch's items, or their
    occurrences among the batch's positions (:func:`position_counts`). Only differences between columns change
    the softmax, so ``total`` defaults to the sum of ``popularity_U``; with a gather hook every rank must use
    the same ``total`` (e.g. the catalog's total interactions), or each rank's block gets a different offset."""
    p_U = popularity_U.float().clamp_min(floor)
    log_total = p_U.sum().log() if total is None else math.log(total)
    return p_U.log() - log_total


def position_counts(seq_BL: torch.Tensor, seq_mask_BL: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(U,) occurrences of each item-table row among the batch's real positions (an in-batch popularity)."""
    return torch.bincount(seq_BL[seq_mask_BL], minlength=n_rows)


def sampled_softmax_logits(
    user_ND: torch.Tensor, items_GD: torch.Tensor, *, temperature: float, log_q_G: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, G) logits ``user . item / temperature``, minus ``log_q_G`` when given (logQ correction)."""
    logits_NG = user_ND @ items_GD.T / temperature
    return logits_NG if log_q_G is None else logits_NG - log_q_G.to(logits_NG.dtype)


def false_negative_mask(
    target_N: torch.Tensor,
    n_columns: int,
    *,
    item_ids_G: torch.Tensor | None = None,
    exclude_NG: torch.Tensor | None = None,
    exclude_NU: torch.Tensor | None = None,
    item_ids_U: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, G) bool, True for candidates to drop: columns holding the target's item again (same ``item_ids_G``,
    i.e. copies gathered from other ranks), padding rows (``item_ids_G`` < 0), ``exclude_NG``, and every column
    holding an item that ``exclude_NU`` drops from the local table (rows ``item_ids_U``; without ids, G = U and the
    columns are the rows). The target column itself is never dropped."""
    drop_NG = torch.zeros(target_N.shape[0], n_columns, dtype=torch.bool, device=target_N.device)
    if item_ids_G is not None:
        drop_NG |= item_ids_G[None, :] == item_ids_G[target_N][:, None]
        drop_NG |= item_ids_G[None, :] < 0
    if exclude_NG is not None:
        drop_NG |= exclude_NG
    if exclude_NU is not None:
        drop_NG |= exclude_NU if item_ids_G is None else _spread(exclude_NU, item_ids_U, item_ids_G)
    rows_N = torch.arange(target_N.shape[0], device=target_N.device)
    drop_NG[rows_N, target_N] = False
    return drop_NG


def _spread(exclude_NU: torch.Tensor, item_ids_U: torch.Tensor | None, item_ids_G: torch.Tensor) -> torch.Tensor:
    """(N, G): ``exclude_NU`` over a gathered table, by item id (a local row's copies on other ranks too)."""
    if item_ids_U is None:
        raise ValueError("exclude_NU with a gathered table needs item_ids_U")
    ids_U, order_U = item_ids_U.sort()
    at_G = torch.searchsorted(ids_U, item_ids_G).clamp_max(len(ids_U) - 1)
    local_G = torch.where(ids_U[at_G] == item_ids_G, order_U[at_G], -1)  # the local row of each column, or -1
    return exclude_NU[:, local_G.clamp_min(0)] & (local_G >= 0)


@dataclass(frozen=True)
class ExtraNegatives:
    """Negatives appended after the (gathered) item table, without gradient: e.g. :class:`NegativeQueue`'s rows of
    earlier batches. ``item_ids_Q`` identifies them like ``item_ids_U`` (so a copy of the target, or of a user's
    excluded history item, is masked); ``log_q_Q`` is their logQ correction (None without one)."""

    items_QD: torch.Tensor
    item_ids_Q: torch.Tensor
    log_q_Q: torch.Tensor | None = None


class NegativeQueue:
    """The unit item embeddings (detached), ids and logQ of the last ``batches`` training batches, oldest first
    (MoCo-style): more negatives than one batch holds, at the cost of embeddings a few steps stale. Held in
    memory only (a resumed run starts with an empty queue)."""

    def __init__(self, batches: int) -> None:
        self.entries: deque[ExtraNegatives] = deque(maxlen=batches)

    def push(self, items_UD: torch.Tensor, item_ids_U: torch.Tensor, log_q_U: torch.Tensor | None) -> None:
        detached = None if log_q_U is None else log_q_U.detach()
        self.entries.append(ExtraNegatives(items_UD.detach(), item_ids_U.detach(), detached))

    def negatives(self, current_ids_U: torch.Tensor) -> ExtraNegatives | None:
        """The queued rows whose items are not in the current table (those are negatives already), or None."""
        if not self.entries:
            return None
        ids_Q = torch.cat([e.item_ids_Q for e in self.entries])
        keep_Q = ~torch.isin(ids_Q, current_ids_U)
        items_QD = torch.cat([e.items_QD for e in self.entries])[keep_Q]
        logq = [e.log_q_Q for e in self.entries]
        log_q_Q = None if any(q is None for q in logq) else torch.cat(logq)[keep_Q]  # type: ignore[arg-type]
        return ExtraNegatives(items_QD, ids_Q[keep_Q], log_q_Q)


def sampled_softmax(
    user_ND: torch.Tensor,
    items_UD: torch.Tensor,
    target_N: torch.Tensor,
    *,
    temperature: float,
    log_q_U: torch.Tensor | None = None,
    item_ids_U: torch.Tensor | None = None,
    exclude_NG: torch.Tensor | None = None,
    exclude_NU: torch.Tensor | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    extra: ExtraNegatives | None = None,
) -> torch.Tensor:
    """In-batch sampled softmax (TransRec's and MISSRec's sequence-item objective): mean cross-entropy of each
    user against the batch's distinct items, the target item being the positive.

    - ``log_q_U``: logQ correction, subtracted from the logits (:func:`log_q_from_popularity`).
    - ``item_ids_U``: an identity per row (e.g. ``domain << 40 | index``; -1 marks a padding row). Only needed
      with a gather hook: rows are distinct within a rank, but the same item can sit on several ranks, and
      those copies of the target are false negatives, so they are masked.
    - ``exclude_NG``: further candidates to mask per user, as columns of the gathered table.
    - ``exclude_NU``: the same as rows of the local table (e.g. the user's own history items); with a gather
      hook every gathered copy of such an item is masked (needs ``item_ids_U``).
    - ``extra``: negatives appended after the gathered table (no gradient flows into them; their copies of the
      target and of excluded items are masked by id, which needs ``item_ids_U``).
    - ``gather``: called on ``items_UD``, ``log_q_U`` and ``item_ids_U``; must return every rank's tensor
      concatenated along dim 0 in rank order, gradients flowing back to the local slice (e.g.
      ``torch.cat(torch.distributed.nn.functional.all_gather(x))``; all_gather needs equal sizes, so pad each
      table to the largest U and give the padding rows item id -1).

    ``target_N`` and ``exclude_NG`` index the *gathered* table: the engine adds its rank's offset (the rows
    gathered from lower ranks, ``rank * U_max`` with padded tables) to its local targets, and places its
    (N, U) exclusions at columns [offset, offset + U) of an (N, G) mask. Without a hook, G = U and no offset.
    """
    gather = _identity if gather is None else gather
    items_GD = gather(items_UD)
    log_q_G = None if log_q_U is None else gather(log_q_U)
    item_ids_G = None if item_ids_U is None else gather(item_ids_U)
    if extra is not None:
        if item_ids_G is None:
            raise ValueError("extra negatives need item_ids_U (to mask copies of the target)")
        items_GD = torch.cat([items_GD, extra.items_QD.to(items_GD.dtype)])
        item_ids_G = torch.cat([item_ids_G, extra.item_ids_Q])
        if (log_q_G is None) != (extra.log_q_Q is None):
            raise ValueError("extra negatives need a logQ correction exactly when the table has one")
        log_q_G = None if log_q_G is None else torch.cat([log_q_G, extra.log_q_Q.to(log_q_G.dtype)])  # type: ignore[union-attr]
    logits_NG = sampled_softmax_logits(user_ND, items_GD, temperature=temperature, log_q_G=log_q_G)
    drop_NG = false_negative_mask(target_N, items_GD.shape[0], item_ids_G=item_ids_G, exclude_NG=exclude_NG,
                                  exclude_NU=exclude_NU, item_ids_U=item_ids_U)  # fmt: skip
    return F.cross_entropy(logits_NG.masked_fill(drop_NG, -math.inf), target_N)


# ---- TransRec ---------------------------------------------------------------------------------------


def cpc_bce(
    prefix_user_BD: torch.Tensor,
    suffix_items_BSD: torch.Tensor,
    suffix_mask_BS: torch.Tensor,
    negatives_BJD: torch.Tensor,
    negatives_mask_BJ: torch.Tensor | None = None,
) -> torch.Tensor:
    """TransRec's contrastive predictive coding: from a prefix's user state, score every item of the suffix
    (positives) and J random negatives, binary cross-entropy on the dot products r:
    L = -sum log sigma(r_pos) - sum log(1 - sigma(r_neg)).

    Normalization, as in TransRec's code (two ``BCEWithLogitsLoss`` means, summed): the mean over the valid
    suffix positions of the batch plus the mean over the valid negatives. So the positive and negative terms
    weigh the same whatever S and J are. ``negatives_mask_BJ`` (optional) drops negatives, e.g. those that
    are among the sequence's positives."""
    r_pos_BS = torch.einsum("bd,bsd->bs", prefix_user_BD, suffix_items_BSD)
    r_neg_BJ = torch.einsum("bd,bjd->bj", prefix_user_BD, negatives_BJD)
    if negatives_mask_BJ is None:
        negatives_mask_BJ = torch.ones_like(r_neg_BJ, dtype=torch.bool)
    # -log sigma(r) = softplus(-r); -log(1 - sigma(r)) = softplus(r)
    return _masked_mean(F.softplus(-r_pos_BS), suffix_mask_BS) + _masked_mean(F.softplus(r_neg_BJ), negatives_mask_BJ)


def next_item_ce(
    states_BLD: torch.Tensor,
    items_UD: torch.Tensor,
    seq_BL: torch.Tensor,
    seq_mask_BL: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """TransRec stage 1 (user-encoder pretraining): every position predicts the sequence's next item, softmax
    cross-entropy over the batch's distinct items (TransRec uses the full item vocabulary; with raw-content
    items the batch's table is the affordable candidate set). Mean over the (position, next item) pairs where
    both are real; padded targets are ignored. ``seq_BL`` holds rows of the item table (-1 = padding)."""
    logits_BLU = states_BLD[:, :-1] @ items_UD.T / temperature
    valid_BL = seq_mask_BL[:, :-1] & seq_mask_BL[:, 1:]
    target_BL = torch.where(valid_BL, seq_BL[:, 1:], 0)
    ce_BL = F.cross_entropy(logits_BLU.transpose(1, 2), target_BL, reduction="none")
    return _masked_mean(ce_BL, valid_BL)


# ---- EM3 and MISSRec ------------------------------------------------------------------------------------


def symmetric_infonce(a_ND: torch.Tensor, b_ND: torch.Tensor, temperature: float) -> torch.Tensor:
    """CLIP-style symmetric InfoNCE: row i of ``a`` and row i of ``b`` are a pair, the other rows of the
    batch are negatives; cosine similarity / temperature; mean of the a->b and b->a cross-entropies."""
    logits_NN = F.normalize(a_ND, dim=-1) @ F.normalize(b_ND, dim=-1).T / temperature
    labels_N = torch.arange(a_ND.shape[0], device=a_ND.device)
    return (F.cross_entropy(logits_NN, labels_N) + F.cross_entropy(logits_NN.T, labels_N)) / 2


def content_id_infonce(content_UD: torch.Tensor, id_UD: torch.Tensor, temperature: float) -> torch.Tensor:
    """EM3's content-ID contrastive loss: symmetric InfoNCE aligning each item's content embedding with its
    ID embedding (rows are the batch's distinct items, so no row is another's false negative)."""
    return symmetric_infonce(content_UD, id_UD, temperature)


def seq_seq_infonce(view1_BD: torch.Tensor, view2_BD: torch.Tensor, temperature: float) -> torch.Tensor:
    """MISSRec's sequence-sequence contrastive loss between two views (augmentations) of the same sequences,
    made symmetric (MISSRec's code uses the view1 -> view2 direction only)."""
    return symmetric_infonce(view1_BD, view2_BD, temperature)


def interest_diversity(memory_BMD: torch.Tensor, memory_mask_BM: torch.Tensor) -> torch.Tensor:
    """MISSRec's diversity regulariser on encoded interest tokens (``UserEncoder.encode_interests``): the
    squared norm of the mean of a sequence's real interest tokens, divided by D, averaged over the batch.
    Small when a sequence's interests point in different directions. (MISSRec's code pools padded tokens
    too and sums over the batch; here the padding is left out and the batch is averaged.)"""
    weight_BM = memory_mask_BM.to(memory_BMD.dtype)
    pooled_BD = (memory_BMD * weight_BM[..., None]).sum(1) / weight_BM.sum(1, keepdim=True).clamp_min(1)
    return pooled_BD.square().sum(1).mean() / memory_BMD.shape[-1]


# ---- combination ------------------------------------------------------------------------------------


def combine(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the losses whose weight is not zero, and each of those losses (and the total) as a
    detached float for logging. Every loss needs a weight, and every non-zero weight needs its loss."""
    unweighted = sorted(set(losses) - set(weights))
    missing = sorted(name for name, w in weights.items() if w != 0 and name not in losses)
    if unweighted or missing:
        raise ValueError(f"losses without a weight: {unweighted}; weighted losses not computed: {missing}")
    used = [name for name in losses if weights[name] != 0]
    if not used:
        raise ValueError(f"every loss has weight 0: {sorted(losses)}")
    total = torch.stack([weights[name] * losses[name] for name in used]).sum()
    logs = {name: float(losses[name].detach()) for name in used}
    logs["total"] = float(total.detach())
    return total, logs


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where, not a product: a NaN at a masked place must not leak; an empty mask gives 0, not NaN
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)
