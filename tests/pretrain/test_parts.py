"""pretrain.parts: a Recommender's parts by parameter name, the per-part counts, their log lines and file, and
finetune's names for them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from torch import nn

from pretrain import parts


def toy() -> nn.Module:
    """Named like a Recommender: a frozen text backbone (6 + 2 weights), its projection (4 + 2), the user (4 + 2),
    the ID table (10)."""
    text = nn.ModuleDict({"backbone": nn.Linear(3, 2), "proj": nn.Linear(2, 2)})
    text["backbone"].requires_grad_(False)
    return nn.ModuleDict({"ids": nn.Embedding(5, 2), "user": nn.Linear(2, 2), "text": text})


def test_counts_are_per_part_in_report_order_with_the_sum() -> None:
    counts = parts.parameter_counts(toy())
    assert counts == {
        "text.backbone": {"trainable": 0, "total": 8},
        "text.head": {"trainable": 6, "total": 6},
        "user": {"trainable": 6, "total": 6},
        "ids": {"trainable": 10, "total": 10},
        "all": {"trainable": 22, "total": 30},
    }
    assert list(counts) == [p for p in parts.PARTS if p in counts] + ["all"]  # PARTS order, not the model's
    assert parts.part_of("image.backbone.model.conv.weight") == "image.backbone"
    assert parts.part_of("image.proj.weight") == "image.head"


def test_the_table_is_logged_and_saved(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    counts = parts.parameter_counts(toy())
    with caplog.at_level(logging.INFO):
        parts.log_counts(logging.getLogger("pretrain.engine"), counts)
    assert caplog.messages[0] == "parameters per part:"
    assert caplog.messages[1].split() == ["text.backbone", "trainable", "0", "of", "8", "parameters"]
    assert caplog.messages[-1].split() == ["all", "trainable", "22", "of", "30", "parameters"]
    path = parts.save_counts(counts, tmp_path / "run")
    assert path == tmp_path / "run" / "parameters.json" and json.loads(path.read_text()) == counts


def test_finetune_reports_with_the_same_helpers() -> None:
    from finetune import modes

    assert (modes.PARTS, modes.part_of, modes.parameter_counts) == (parts.PARTS, parts.part_of, parts.parameter_counts)
