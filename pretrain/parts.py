"""The parts of a Recommender and their parameter counts: what trains, per part, logged and saved by every run.

A parameter's part follows from its name (:func:`part_of`): ``text.backbone``, ``text.head`` (pooling and
projection), ``image.backbone``, ``image.head`` (projection), ``fusion``, ``user``, ``ids``. Pretraining logs the
table at its start and writes it to ``run.out_dir/parameters.json``; finetuning (:mod:`finetune.modes` re-exports
these names) also puts it in its summary.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .outputs import write_json

PARTS = ("text.backbone", "text.head", "image.backbone", "image.head", "fusion", "user", "ids")
"""The parts of a Recommender, in the order of reports."""
COUNTS_FILE = "parameters.json"
"""The table's file in a run's out_dir."""

Counts = dict[str, dict[str, int]]
"""``{part: {"trainable": n, "total": n}}``, the parts in :data:`PARTS` order, then ``"all"``."""


def part_of(name: str) -> str:
    """The part (one of :data:`PARTS`) of the parameter or buffer ``name`` of a Recommender."""
    head, _, rest = name.partition(".")
    if head in ("text", "image"):
        return f"{head}.backbone" if rest.startswith("backbone.") else f"{head}.head"
    return head


def parameter_counts(model: nn.Module, state: Mapping[str, torch.Tensor] | None = None) -> Counts:
    """``{part: {"trainable": n, "total": n}}`` for the parts the model has, plus ``"all"``; trainable from each
    parameter's ``requires_grad``. Sizes from the parameters themselves, so call it before DeepSpeed ZeRO-3
    partitions them (their ``numel()`` is 0 afterwards), or from ``state``, a full state dict gathered after it."""
    counts: Counts = {}
    for name, param in model.named_parameters():
        n = state[name].numel() if state is not None and name in state else param.numel()
        row = counts.setdefault(part_of(name), {"trainable": 0, "total": 0})
        row["total"] += n
        row["trainable"] += n if param.requires_grad else 0
    ordered = {part: counts[part] for part in PARTS if part in counts}
    ordered.update({part: row for part, row in counts.items() if part not in ordered})  # a part not in PARTS
    ordered["all"] = {key: sum(row[key] for row in counts.values()) for key in ("trainable", "total")}
    return ordered


def count_lines(counts: Counts) -> list[str]:
    """The table as log lines, one per part: ``  user            trainable      1,234 of      5,678 parameters``."""
    return [f"  {part:<15} trainable {row['trainable']:>10} of {row['total']:>10} parameters"
            for part, row in counts.items()]  # fmt: skip


def log_counts(logger: logging.Logger, counts: Counts) -> None:
    """Log the table (INFO), a heading and one line per part."""
    logger.info("parameters per part:")
    for line in count_lines(counts):
        logger.info(line)


def save_counts(counts: Counts, out_dir: str | Path) -> Path:
    """Write the table to ``out_dir/parameters.json`` (atomically); returns the path."""
    return write_json(Path(out_dir) / COUNTS_FILE, counts, indent=2)
