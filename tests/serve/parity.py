"""Ranking held-out users both ways: the model's own (pretrain.ranking, float64 scores, the tie order of
evaluation) and the served files' (the ONNX user tower in onnxruntime, then FAISS), for the parity tests."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from pretrain.catalog import encode_catalog_content, select
from pretrain.config import TrainConfig
from pretrain.heldout import held_out_users, padded, user_batch
from pretrain.metrics import tiebreak_order
from pretrain.model import Recommender
from pretrain.ranking import EvalOptions, _model_scores, evaluate_domain, model_for_domain
from shards import schema

K = 10
TIE = 1e-5
"""Scores closer than this are ties: float32 FAISS against evaluation's float64 may order them either way."""


@dataclass
class Both:
    model_user_BD: torch.Tensor
    served_user_BD: torch.Tensor
    model_scores_BC: torch.Tensor
    """The model's scores of every catalog item."""
    model_top_BK: torch.Tensor
    served_top_BK: torch.Tensor
    served_scores_BC: torch.Tensor
    """FAISS's scores of every catalog item (a full search)."""
    eval_ranks: list[int]
    """Each test user's target rank from pretrain.ranking.evaluate_domain (users in index order)."""
    targets: list[int]
    tiebreak_C: torch.Tensor
    seen: list[tuple[int, ...]]


@torch.no_grad()
def rank_both(model: Recommender, cfg: TrainConfig, data: str, served: Path) -> Both:
    """Every test user of ``data`` ranked by ``model`` and by the files in ``served`` (a domain subfolder)."""
    manifest = schema.load_manifest(data)
    model, domain = model_for_domain(model, cfg, manifest)
    stream = cfg.data.stream
    catalog = encode_catalog_content(model, data, domain, stream).items
    users = sorted(held_out_users(data, "test", stream.max_seq_len), key=lambda u: u.user)
    batch = user_batch(users)
    user_BD = model.user_vectors(batch, select(catalog, batch.item_rows)).double()
    scores_BC = _model_scores(model, user_BD, catalog, slice(None))  # evaluation's: float64, rounded to float32
    seen = [u.seen for u in users]
    tiebreak_C = tiebreak_order(manifest.n_items, manifest.domain)
    history_BL = padded([u.history for u in users], -1, torch.long).numpy()
    session = ort.InferenceSession(str(served / "user_tower.onnx"), providers=["CPUExecutionProvider"])
    served_BD = session.run(None, {"history": history_BL})[0]
    index = faiss.read_index(str(served / "items.faiss"))
    full_scores, full_rows = index.search(served_BD, manifest.n_items)
    served_scores_BC = torch.full((len(users), manifest.n_items), math.nan)
    served_scores_BC.scatter_(1, torch.from_numpy(full_rows), torch.from_numpy(full_scores))
    result = evaluate_domain(model, data, domain, stream, EvalOptions(splits=("test",)))
    return Both(
        model_user_BD=F.normalize(user_BD, dim=-1),
        served_user_BD=torch.from_numpy(served_BD).double(),
        model_scores_BC=scores_BC,
        model_top_BK=_top(scores_BC, tiebreak_C, seen),
        served_top_BK=_served_top(index, served_BD, seen),
        served_scores_BC=served_scores_BC,
        eval_ranks=result.tallies["test"].user_ranks()["full"],
        targets=[u.target for u in users],
        tiebreak_C=tiebreak_C,
        seen=seen,
    )


def _top(scores_BC: torch.Tensor, tiebreak_C: torch.Tensor, seen: list[tuple[int, ...]]) -> torch.Tensor:
    """(B, K) the K best items of each row but the user's earlier items, score ties in tie order (as evaluation
    ranks them)."""
    out = []
    for row, s in zip(scores_BC.double().clone(), seen):
        row[list(s)] = -math.inf
        order = np.lexsort((tiebreak_C.numpy(), -row.numpy()))
        out.append(order[:K])
    return torch.tensor(np.array(out))


def _served_top(index: faiss.Index, user_BD: np.ndarray, seen: list[tuple[int, ...]]) -> torch.Tensor:
    """(B, K) what a server does: search K + len(seen) and drop the user's earlier items."""
    tops = []
    for b, s in enumerate(seen):
        _, rows = index.search(user_BD[b : b + 1], K + len(set(s)))
        tops.append([int(c) for c in rows[0] if c not in set(s)][:K])
    return torch.tensor(tops)


def served_rank(both: Both, b: int) -> tuple[int, int]:
    """(rank of user b's target by FAISS's scores with evaluation's rule, items within TIE of its model score)."""
    target, scores_C = both.targets[b], both.served_scores_BC[b].clone()
    scores_C[[c for c in both.seen[b] if c != target]] = -math.inf  # the target is never masked, as in evaluation
    t = scores_C[target]
    above = (scores_C > t) | ((scores_C == t) & (both.tiebreak_C < both.tiebreak_C[target]))
    above[target] = False
    model_C = both.model_scores_BC[b]
    near = int(((model_C - model_C[target]).abs() < TIE).sum()) - 1
    return int(above.sum()), near


def items_json(served: Path) -> dict:
    return json.loads((served / "items.json").read_text())
