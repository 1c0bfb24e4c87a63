"""The un-deduplicated batch (every history position and target its own row of the item table, as a pipeline
without deduplication encodes them) and the training step's loss with or without it.

Shape legend::

    B sequences   L positions   U distinct items of the batch (the table's rows)   D model width
    V rows of the un-deduplicated table: one per real history position, then one per target
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pretrain.model import ItemEmbeddings
from shards.collate import Batch


@dataclass
class Undeduplicated:
    """A batch whose item table has one row per real history position and per target (no item shared)."""

    batch: Batch
    """The same sequences over V rows: ``seq`` and ``target`` point at their own rows."""
    row_of_V: torch.Tensor
    """(V,) the row of the original (deduplicated) table each row copies."""


def undeduplicate(batch: Batch) -> Undeduplicated:
    """``batch`` with its item table expanded so that every (sequence, position) and every target gets its own
    row (texts, images, ids copied): encoding it costs what a pipeline without deduplication pays."""
    b_P, t_P = torch.nonzero(batch.seq_mask, as_tuple=True)
    targets = batch.target if batch.target is not None else batch.seq.new_zeros(0)
    row_of_V = torch.cat([batch.seq[b_P, t_P], targets])
    P, V = b_P.shape[0], row_of_V.shape[0]
    seq_BL = torch.full_like(batch.seq, -1)
    seq_BL[b_P, t_P] = torch.arange(P, device=seq_BL.device)
    image_row_V = batch.image_row[row_of_V]
    has_image_V = image_row_V >= 0
    table = {
        name: getattr(batch, name)[row_of_V]
        for name in ("item_domain", "item_index", "input_ids", "attention_mask", "has_text")
    }
    expanded = dataclasses.replace(
        batch,
        **table,
        pixel_values=batch.pixel_values[image_row_V[has_image_V]],
        image_row=torch.where(has_image_V, has_image_V.long().cumsum(0) - 1, -1),
        has_image=has_image_V,
        seq=seq_BL,
        target=None if batch.target is None else torch.arange(P, V, device=seq_BL.device),
    )
    return Undeduplicated(expanded, row_of_V)


def collapse(items: ItemEmbeddings, row_of_V: torch.Tensor, n_rows: int) -> ItemEmbeddings:
    """Encodings of the V expanded rows -> the U rows of the original table: floating fields are the mean of an
    item's copies (equal to each copy without dropout; every copy gets its share of the gradient), the others
    (flags, catalog rows) come from a copy. The objective then sees the same candidates as with deduplication."""
    counts_U = torch.bincount(row_of_V, minlength=n_rows).clamp_min(1)
    first_U = torch.zeros(n_rows, dtype=torch.long, device=row_of_V.device)
    first_U[row_of_V] = torch.arange(row_of_V.shape[0], device=row_of_V.device)  # copies are equal: any one will do
    out = {}
    for f in dataclasses.fields(items):
        x = getattr(items, f.name)
        if x is None or not x.is_floating_point():
            out[f.name] = None if x is None else x[first_U]
            continue
        summed = x.new_zeros((n_rows, *x.shape[1:])).index_add(0, row_of_V, x)
        out[f.name] = summed / counts_U.to(x.dtype).view(-1, *[1] * (x.ndim - 1))
    return ItemEmbeddings(**out)


def step_loss(model: Any, batch: Batch, undedup: Undeduplicated | None = None) -> torch.Tensor:
    """The training loss of ``batch``; with ``undedup``, its items encoded from the un-deduplicated table.
    ``model``: a Recommender or the DeepSpeed engine around one."""
    if undedup is None:
        return model(batch).loss
    module = getattr(model, "module", model)
    items = collapse(module.encode_items(undedup.batch), undedup.row_of_V, len(batch.item_index))
    return model(batch, None, items).loss


@torch.no_grad()
def check_faithful(module: nn.Module, batch: Batch, undedup: Undeduplicated, seed: int = 0) -> dict[str, float]:
    """In eval mode (no dropout): the loss with and without deduplication, the largest difference of the user
    vectors computed from each table, and the loss of the expanded batch fed as it is (its duplicate rows are
    extra in-batch negatives, so that one is *not* expected to match)."""
    was_training = module.training
    module.eval()
    try:
        values = {}
        for name, fn in [
            ("loss_dedup", lambda: step_loss(module, batch)),
            ("loss_undedup", lambda: step_loss(module, batch, undedup)),
            ("loss_expanded_as_is", lambda: module(undedup.batch).loss),
        ]:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # CPC negatives and seq-seq views are random: the same draws for all
                values[name] = float(fn())
        users = module.user_vectors(batch) - module.user_vectors(undedup.batch)
        values["user_vectors_max_abs_diff"] = float(users.abs().max())
    finally:
        module.train(was_training)
    return values


def faithful(check: dict[str, float], rtol: float = 1e-4) -> bool:
    scale = max(1.0, abs(check["loss_dedup"]))
    return (
        abs(check["loss_dedup"] - check["loss_undedup"]) <= rtol * scale
        and check["user_vectors_max_abs_diff"] <= rtol * 10
    )


def train_step(engine: Any, batch: Batch, undedup: Undeduplicated | None) -> tuple[float, float]:
    """(wall, CPU) seconds of one training step (CPU time: of all this process's threads)."""
    start, cpu = time.perf_counter(), time.process_time()
    loss = step_loss(engine, batch, undedup)
    engine.backward(loss)
    engine.step()
    return time.perf_counter() - start, time.process_time() - cpu


def encodings(batch: Batch) -> tuple[int, int]:
    """(distinct items, item occurrences: real history positions plus targets) of ``batch``."""
    targets = 0 if batch.target is None else len(batch.target)
    return len(batch.item_index), int(batch.seq_mask.sum()) + targets
