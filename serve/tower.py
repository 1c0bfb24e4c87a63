"""The user tower for serving: a user's history (catalog indices) in, the unit user vector out, exported to ONNX.

:class:`UserTower` is the model's own user encoder (:class:`pretrain.user.UserEncoder`) with one domain's encoded
catalog baked in as a buffer: the graph looks up each history item's embedding (``items_UD`` of
``Recommender.encode_items``, the rows sequences are made of), runs the causal Transformer, reads the state at the
last real position (:func:`pretrain.user.user_states`) and normalizes it, so that the inner product with the unit
item vectors of the FAISS index is the model's cosine score.

MISSRec interest memory: evaluation gives a sequence the distinct interest prototypes of its items, ascending,
left-aligned (:func:`pretrain.interests.interest_memory`). The tower gives every sequence all P interest tokens
and masks those none of its items belongs to: the interest encoder has no positions (bidirectional attention over
a set) and cross-attention sums over the memory, so the order of the tokens does not matter and the result is the
same up to float rounding, without a data-dependent width M that ONNX would have to handle.

Shape legend::

    B users    L history positions (<= max_seq_len)    C catalog items of the domain    D model width
    P interest tokens
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.cli import quiet_loggers
from pretrain.model import Recommender
from pretrain.user import user_states

log = logging.getLogger(__name__)

INPUT = "history"
OUTPUT = "user"
OPSET = 18


def interest_rows(model: Recommender, rows_C: torch.Tensor) -> torch.Tensor | None:
    """The MISSRec prototype of each catalog row when the tower must give it interest memory, None when it must
    not (no interest tokens, or none computed for these items: evaluation then uses no memory either). A domain
    with some items clustered and others not is a ValueError: evaluation's user vector would then depend on which
    other users share a batch, which no fixed graph reproduces."""
    if not model.model_cfg.user.interest_tokens:
        return None
    prototype_C = model.prototype_of[rows_C]
    known = int((prototype_C >= 0).sum())
    if known == 0:
        return None
    if known < len(prototype_C):
        raise ValueError(
            f"only {known} of the domain's {len(prototype_C)} items have a MISSRec interest prototype "
            "(model.user.interest_tokens): such a model gives a user interest memory only when every item of the "
            "batch has one, which a served user tower cannot reproduce; refresh the interests on the whole catalog"
        )
    return prototype_C


class UserTower(nn.Module):
    """``forward(history_BL) -> user_BD``: catalog indices, right-padded with -1 (at least one real item per
    row, the most recent ``max_seq_len`` at most), to unit user vectors."""

    def __init__(self, model: Recommender, table_CD: torch.Tensor, prototype_C: torch.Tensor | None) -> None:
        super().__init__()
        self.user = copy.deepcopy(model.user)  # a copy: moved to the CPU for export without moving the model
        self.register_buffer("table_CD", table_CD.detach().float().clone())
        self.memory = prototype_C is not None
        if prototype_C is not None:
            self.register_buffer("prototype_C", prototype_C.detach().clone())
            self.register_buffer("interests_PD", model.interests.detach().float().clone())

    def forward(self, history_BL: torch.Tensor) -> torch.Tensor:
        mask_BL = history_BL >= 0
        index_BL = history_BL.clamp_min(0)
        items_BLD = self.table_CD[index_BL]
        memory_BPD = memory_mask_BP = None
        if self.memory:
            P = self.interests_PD.shape[0]
            proto_BL = self.prototype_C[index_BL]
            hits_BLP = (proto_BL[:, :, None] == torch.arange(P, device=history_BL.device)) & mask_BL[:, :, None]
            memory_mask_BP = hits_BLP.any(dim=1)
            memory_BPD = torch.where(memory_mask_BP[..., None], self.interests_PD, 0.0)
        states_BLD = self.user(items_BLD, mask_BL, memory_BPD, memory_mask_BP)
        return F.normalize(user_states(states_BLD, mask_BL), dim=-1)


Exporter = Literal["dynamo", "legacy"]


def example_history(max_seq_len: int, n_items: int) -> torch.Tensor:
    """A (2, L) history to trace with (L = min(3, max_seq_len)): two users, the second one padded."""
    L = min(3, max_seq_len)
    history_BL = torch.arange(2 * L).view(2, L) % n_items
    if L > 1:
        history_BL[1, -1] = -1
    return history_BL


def export_onnx(tower: UserTower, path: Path, exporter: Exporter = "dynamo") -> Exporter:
    """Write ``tower`` to ``path`` (input ``history`` int64 (batch, length), output ``user`` float32 (batch, D),
    both axes dynamic, length up to max_seq_len). ``dynamo``: ``torch.onnx.export(dynamo=True)``, falling back to
    the TorchScript exporter (with a warning) when it fails; ``legacy``: the TorchScript exporter alone (about 20x
    faster to export, the same graph semantics). Returns the exporter that wrote the file."""
    tower = tower.eval()
    example = example_history(tower.user.max_seq_len, tower.table_CD.shape[0])
    if exporter == "dynamo":
        try:
            _export_dynamo(tower, example, path)
            return "dynamo"
        except Exception as e:  # the new exporter fails on constructs the old one handles: fall back
            log.warning("torch.onnx.export(dynamo=True) failed (%s: %s); using the TorchScript exporter",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")  # fmt: skip
    _export_legacy(tower, example, path)
    return "legacy"


def _export_dynamo(tower: UserTower, example: torch.Tensor, path: Path) -> None:
    max_len = tower.user.max_seq_len
    length = torch.export.Dim("length", max=max_len) if max_len > 1 else None
    dynamic = {"history_BL": {0: torch.export.Dim("batch"), 1: length}}
    with quiet_loggers(*_CHATTY), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own use of a deprecated pytree API
        program = torch.onnx.export(tower, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes=dynamic, opset_version=OPSET, verbose=False)  # fmt: skip
        program.save(str(path))


_CHATTY = ("torch.onnx", "onnx_ir", "onnxscript")
"""Loggers of the dynamo exporter: a line per optimization pass at INFO, and a warning per torchvision op."""


def _export_legacy(tower: UserTower, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():  # its tracer warns about Python conditions on shapes: evaluated once, as intended
        warnings.simplefilter("ignore")
        torch.onnx.export(tower, (example,), str(path), dynamo=False, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch", 1: "length"}, OUTPUT: {0: "batch"}},
                          opset_version=OPSET)  # fmt: skip
