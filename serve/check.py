"""The served user tower against the model: user vectors of held-out users from onnxruntime and from PyTorch the
way evaluation computes them (:mod:`pretrain.ranking`), and their largest difference.

Shape legend::

    B users    L history positions    D model width
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from pretrain.catalog import select
from pretrain.heldout import HeldOut, held_out_users, padded, user_batch
from pretrain.model import ItemEmbeddings, Recommender

from .tower import INPUT


def histories(users: Sequence[HeldOut]) -> np.ndarray:
    """(B, L) int64: the users' histories in catalog indices, right-padded with -1 (the user tower's input)."""
    return padded([u.history for u in users], -1, torch.long).numpy()


@torch.no_grad()
def model_user_vectors(model: Recommender, catalog: ItemEmbeddings, users: Sequence[HeldOut]) -> torch.Tensor:
    """(B, D) float64 unit user vectors as evaluation computes them (``_Ranker.add``: the users' histories over the
    encoded catalog's rows, ``user_vectors``, then ``score`` normalizes)."""
    device = catalog.items_UD.device
    batch = user_batch(users, device)
    user_BD = model.user_vectors(batch, select(catalog, batch.item_rows)).double()
    return F.normalize(user_BD, dim=-1).cpu()


def onnx_user_vectors(path: str | Path, history_BL: np.ndarray) -> np.ndarray:
    """(B, D) float32 user vectors of the ONNX user tower at ``path``, run in onnxruntime on the CPU."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT: history_BL})[0]


def check_tower(
    path: Path, model: Recommender, catalog: ItemEmbeddings, folder: str | Path, users: int, max_seq_len: int
) -> dict[str, float | int]:
    """The first ``users`` test users of ``folder`` (seeded order, as ``--users`` of evaluation) through the ONNX
    tower and through the model: ``{"users": n, "max_abs_diff": ...}``."""
    held = list(held_out_users(folder, "test", max_seq_len, users=users))
    if not held:
        return {"users": 0, "max_abs_diff": 0.0}
    served_BD = torch.from_numpy(onnx_user_vectors(path, histories(held))).double()
    reference_BD = model_user_vectors(model, catalog, held)
    return {"users": len(held), "max_abs_diff": float((served_BD - reference_BD).abs().max())}
