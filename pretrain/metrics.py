"""Ranking a held-out target and the metrics of ranks: the pure part of :mod:`pretrain.ranking` (no model).

Rank (0-based) of a user's target = the candidates scoring higher + the candidates scoring the same that come
first in a fixed random order of the catalog (:func:`tiebreak_order`), so that a collapsed model (all scores
equal) ranks like a random ranker, not a perfect one. Candidates: every catalog item except the user's earlier
items (full ranking; the target is never masked, even when met before), or sampled negatives. Scores are taken
``chunk`` items at a time with running counts (:func:`rank_targets`): a (users x chunk) block, never users x items.

Metrics of one user, averaged over users: HR@k = [r < k], NDCG@k = [r < k] / log2(r + 2), MRR@k = [r < k] / (r + 1),
for k in KS. A :class:`Tally` keeps integer counts of users per rank below max(KS), per bucket of the target item,
from which every metric follows: exact sums across batches and ranks, in any order.

Buckets of the target item (a user counts in every bucket its target is in), :func:`item_buckets`:

- by training popularity (the manifest's ``popularity``): ``cold``: no training interaction; ``head``: the most
  popular 20% of the catalog's items (``head_share``: popularity >= that of the item at the 20% mark, so ties
  there are head, and >= 1); ``tail``: every other item with at least one training interaction;
- by the item's content as stored in the items shards: ``text_image``, ``text_only``, ``image_only``,
  ``no_content``.

Shape legend::

    B users    C catalog items (or those of one block)    H a user's earlier items    N sampled negatives
    Q buckets    R ranks below max(KS)
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .distributed import all_gather_rows, world_size

KS = (1, 5, 10, 20, 50)
METRICS = ("hr", "ndcg", "mrr")
POPULARITY_BUCKETS = ("head", "tail", "cold")
MODALITY_BUCKETS = ("text_image", "text_only", "image_only", "no_content")
BUCKETS = ("all", *POPULARITY_BUCKETS, *MODALITY_BUCKETS)
SCORE_CHUNK = 4096
"""Catalog items scored per block."""

# ---- ranking -------------------------------------------------------------------------------------------------

ScoreFn = Callable[[torch.Tensor | slice], torch.Tensor]
"""``score(rows)``: (B, len(rows)) scores of a batch's users against those catalog items."""


def in_block(index_BH: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """(B, stop - start) True where catalog item ``start + c`` is in row b of ``index_BH`` (-1: padding)."""
    inside_BH = (index_BH >= start) & (index_BH < stop)
    out = torch.zeros((index_BH.shape[0], stop - start + 1), dtype=torch.bool, device=index_BH.device)
    out.scatter_(1, torch.where(inside_BH, index_BH - start, stop - start), True)
    return out[:, :-1]


def rank_targets(
    score: ScoreFn,
    n_items: int,
    target_B: torch.Tensor,
    seen_BH: torch.Tensor,
    tiebreak_C: torch.Tensor,
    chunk: int = SCORE_CHUNK,
    negatives_BN: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B,) 0-based rank of each target among the catalog items not in ``seen_BH`` (full ranking) and, with
    ``negatives_BN``, among those negatives alone: the items scoring higher, plus the items scoring the same that
    come first in ``tiebreak_C`` order. ``chunk`` items are scored at a time, with running counts. NaN scores
    count as -inf."""
    t_B1 = score(target_B).diagonal().nan_to_num(nan=-math.inf)[:, None]
    tie_B1 = tiebreak_C[target_B][:, None]
    full_B = torch.zeros_like(target_B)
    sampled_B = None if negatives_BN is None else torch.zeros_like(target_B)
    for start in range(0, n_items, chunk):
        stop = min(start + chunk, n_items)
        s_BC = score(slice(start, stop)).nan_to_num(nan=-math.inf)
        above_BC = (s_BC > t_B1) | ((s_BC == t_B1) & (tiebreak_C[None, start:stop] < tie_B1))
        above_BC &= ~in_block(seen_BH, start, stop)
        above_BC &= torch.arange(start, stop, device=target_B.device) != target_B[:, None]  # itself
        full_B += above_BC.sum(1)
        if negatives_BN is not None:
            sampled_B += (above_BC & in_block(negatives_BN, start, stop)).sum(1)
    return full_B, sampled_B


def tiebreak_order(n_items: int, domain: str, seed: int = 0) -> torch.Tensor:
    """(C,) each item's place in the fixed random order that breaks score ties (seeded by seed and domain)."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{domain}".encode()))
    return torch.randperm(n_items, generator=generator)


def sample_negatives(n_items: int, n: int, excluded: Iterable[int], key: Sequence[int]) -> np.ndarray:
    """``n`` distinct items outside ``excluded`` (fewer when there are not as many), drawn uniformly by a
    generator seeded with ``key``: the same for a user whatever the batch or rank it is evaluated in."""
    excluded = np.unique(np.fromiter(excluded, dtype=np.int64))
    take = min(n, n_items - len(excluded))
    drawn = np.random.default_rng(list(key)).choice(n_items, size=min(n_items, take + len(excluded)), replace=False)
    return drawn[~np.isin(drawn, excluded)][:take]


# ---- metrics and buckets -------------------------------------------------------------------------------------


def metric_weights(metric: str, cutoff: int = max(KS)) -> torch.Tensor:
    """(cutoff,) float64: what a user whose target has 0-based rank r < cutoff adds to ``metric``@k for k > r."""
    r = torch.arange(cutoff, dtype=torch.float64)
    return {"hr": torch.ones_like(r), "ndcg": 1 / torch.log2(r + 2), "mrr": 1 / (r + 1)}[metric]


def item_buckets(
    popularity: Sequence[int], modality_C: torch.Tensor, head_share: float = 0.2
) -> tuple[torch.Tensor, dict[str, dict[str, Any]]]:
    """(C, Q) bool membership of each catalog item in BUCKETS, and each bucket's definition and item count."""
    pop_C = torch.tensor(popularity, dtype=torch.long)
    n_head = max(1, math.ceil(head_share * len(popularity)))
    threshold = max(1, int(pop_C.sort(descending=True).values[n_head - 1])) if len(popularity) else 1
    head_C, cold_C = pop_C >= threshold, pop_C == 0
    by_popularity = [head_C, ~head_C & ~cold_C, cold_C]
    by_content = [modality_C.cpu() == m for m in range(len(MODALITY_BUCKETS))]
    member_CQ = torch.stack([torch.ones_like(head_C), *by_popularity, *by_content], dim=1)
    defined = {
        "head": f"the most popular {head_share:.0%} of the catalog's items: training popularity >= {threshold}",
        "tail": f"items with at least 1 and fewer than {threshold} training interactions",
        "cold": "items without training interaction (popularity 0)",
        "text_image": "items stored with text and image",
        "text_only": "items stored with text only",
        "image_only": "items stored with an image only",
        "no_content": "items stored without text and image",
    }
    info = {b: {"items": int(member_CQ[:, q + 1].sum()), "definition": defined[b]} for q, b in enumerate(BUCKETS[1:])}
    info["head"]["min_popularity"] = threshold
    return member_CQ, info


class Tally:
    """Users of one split per target rank below max(KS), per ranking (``full``, ``full/pop``, ``sampled100``, ...)
    and bucket: integer counts from which every metric follows, so the result does not depend on the order in
    which users are added (batch size, ranks) and sums across ranks are exact."""

    def __init__(self, rankings: Sequence[str]) -> None:
        self.rankings = tuple(rankings)
        self.ranks = torch.zeros((len(rankings), len(BUCKETS), max(KS)), dtype=torch.long)
        """(rankings, Q, max(KS)) users whose target ranked r, for each r < max(KS)."""
        self.users = torch.zeros(len(BUCKETS), dtype=torch.long)
        self.per_user: dict[str, list[torch.Tensor]] = {r: [] for r in ("user", *self.rankings)}
        """Per-user records, in the order added: ``user`` the user indices, and per ranking their 0-based target
        ranks (uncapped), so that two models can be compared user by user (:mod:`pretrain.paired`)."""

    def add(
        self, ranking: str, rank_B: torch.Tensor, member_BQ: torch.Tensor, user_B: torch.Tensor | None = None
    ) -> None:
        """Users (indices ``user_B``, recorded once per batch with the first ranking) with 0-based target ranks
        ``rank_B`` and bucket membership ``member_BQ``."""
        cutoff = max(KS)
        at_BR = torch.nn.functional.one_hot(rank_B.cpu().clamp(max=cutoff), cutoff + 1)[:, :cutoff]
        counts_QR = member_BQ.cpu().double().T @ at_BR.double()  # small integers: exact in float64
        self.ranks[self.rankings.index(ranking)] += counts_QR.round().long()
        if user_B is not None:
            self.per_user["user"].append(user_B.cpu().long())
        self.per_user[ranking].append(rank_B.cpu().long())

    def user_ranks(self) -> dict[str, list[int]]:
        """``{"user": [user index, ...], ranking: [0-based target rank, ...], ...}``, users sorted by index."""
        cols = {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for k, v in self.per_user.items()}
        order = torch.argsort(cols["user"], stable=True)
        return {k: v[order].tolist() for k, v in cols.items() if len(v) == len(order)}

    def count(self, member_BQ: torch.Tensor) -> None:
        self.users += member_BQ.long().sum(0).cpu()

    def all_reduce(self, device: torch.device) -> None:
        """Sum over the ranks of the process group (if any)."""
        if world_size() == 1:
            return
        flat = torch.cat([self.ranks.flatten(), self.users]).to(device)
        torch.distributed.all_reduce(flat)
        flat = flat.cpu()
        self.ranks, self.users = flat[: self.ranks.numel()].view_as(self.ranks), flat[self.ranks.numel() :]
        self.per_user = {k: [_gather_users(v, device)] for k, v in self.per_user.items()}

    def __add__(self, other: Tally) -> Tally:
        """The two tallies' users together (their per-user records too: add tallies of different domains only
        for the sums, since user indices are per domain)."""
        assert self.rankings == other.rankings
        out = Tally(self.rankings)
        out.ranks, out.users = self.ranks + other.ranks, self.users + other.users
        out.per_user = {k: self.per_user[k] + other.per_user[k] for k in self.per_user}
        return out

    def mean(self, ranking: str, metric: str, k: int, bucket: str = "all") -> float:
        """``metric``@``k`` averaged over the bucket's users (NaN without users)."""
        q = BUCKETS.index(bucket)
        users = int(self.users[q])
        at_R = self.ranks[self.rankings.index(ranking), q, :k].double()
        return float(at_R @ metric_weights(metric, k)) / users if users else math.nan

    def metrics(self, split: str) -> dict[str, float]:
        """Flat names (see the module docstring); buckets without users have only their user count."""
        out: dict[str, float] = {}
        for q, bucket in enumerate(BUCKETS):
            suffix = "" if bucket == "all" else f"/{bucket}"
            out[f"{split}/users{suffix}"] = float(self.users[q])
            if not self.users[q]:
                continue
            for ranking in self.rankings:
                for metric in METRICS:
                    for k in KS:
                        out[f"{split}/{ranking}/{metric}@{k}{suffix}"] = self.mean(ranking, metric, k, bucket)
        return out


def _gather_users(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Every rank's per-user records (1-D long), concatenated in rank order, on the CPU."""
    local = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return all_gather_rows(local.to(device)).cpu()
