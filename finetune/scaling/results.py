"""``results.csv``: one row per finished cell, appended as each cell ends (a crash loses no finished cell)."""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path
from typing import Any

from .grid import Cell, fraction_name

METRICS = ("ndcg@10", "hr@10", "mrr@10", "ndcg@20", "hr@20", "ndcg@50", "hr@50")
"""Full-ranking test metrics of the whole target test split, from the run's ``test/full/<metric>``; the same at
the start of finetuning (``start_ndcg@10``, ``start_hr@10``: the pretrained model zero-shot, or the untrained
control)."""
BUCKETS = ("cold", "tail")
"""Test targets by the training popularity of the whole target domain, which every cell is tested on
(pretrain.metrics.item_buckets): ``cold`` items without a training interaction, ``tail`` the rest outside the most
popular 20 %, where content should beat IDs: ``<metric>_<bucket>`` for the BUCKET_METRICS and ``users_<bucket>``,
the test users whose target is one."""
BUCKET_METRICS = ("ndcg@10", "hr@10")
GAIN_METRICS = ("ndcg@10", "hr@10")
"""A pretrained cell's paired gain over its control cell: ``gain_<metric>`` (mean per-user difference on the
target's test users) and its 95 % bootstrap interval ``gain_<metric>_low`` .. ``_high`` (pretrain.paired)."""


COLUMNS = (
    "cell", "kind", "source_fraction", "target_fraction", "seed", "mode",
    "source_users", "source_interactions", "target_users", "target_interactions",
    *METRICS, "pop_ndcg@10", "pop_hr@10", "start_ndcg@10", "start_hr@10",
    *(f"{m}_{b}" for b in BUCKETS for m in BUCKET_METRICS), *(f"users_{b}" for b in BUCKETS),
    *(f"gain_{m}{end}" for m in GAIN_METRICS for end in ("", "_low", "_high")),
    "trainable_params", "total_params", "steps", "best_step",
    "pretrain_s", "train_s", "wall_s", "peak_rss_gb", "cuda_max_allocated_gb", "device", "finished",
)  # fmt: skip


POOLED_COLUMNS = (
    "source_fraction", "target_fraction", "seeds", "users", "source_interactions",
    *(f"gain_{m}{end}" for m in GAIN_METRICS for end in ("", "_low", "_high")),
)  # fmt: skip
"""``pooled.csv``: per source fraction (> 0) and target fraction with two or more seeds finished on both arms, the
gain over the control pooled over seeds (each user's difference averaged over the seeds, then bootstrapped over
users: pretrain.paired.compare with every seed's results)."""


def read(path: Path, columns: tuple[str, ...] = COLUMNS) -> list[dict[str, str]]:
    """The rows of ``path`` (none when it does not exist); a header that is not ``columns`` is an error."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != columns:
            raise ValueError(f"{path}: the header is not the one this version writes ({columns}); move the file away")
        return list(reader)


def write_pooled(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite ``pooled.csv`` whole (atomically: a reader sees the old file or the new one)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=POOLED_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _text(row.get(c)) for c in POOLED_COLUMNS})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buffer.getvalue(), encoding="utf-8")
    os.replace(tmp, path)


def key(row: dict[str, str]) -> tuple[str, str, str, str]:
    return row["kind"], row["source_fraction"], row["target_fraction"], row["seed"]


def append(path: Path, row: dict[str, Any]) -> None:
    """Add one row (the header first when the file is new); one write call of a whole line, flushed and synced."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    new = not path.is_file() or path.stat().st_size == 0
    if new:
        writer.writeheader()
    writer.writerow({c: _text(row.get(c)) for c in COLUMNS})
    with path.open("a", encoding="utf-8", newline="") as f:
        f.write(buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def row(
    cell: Cell,
    mode: str,
    summary: dict[str, Any],
    source: tuple[int, int],
    target: tuple[int, int],
    pretrain_s: float | None,
    wall_s: float,
    device: str,
) -> dict[str, Any]:
    """The CSV row of a finished cell from its finetune ``summary`` (summary.json)."""
    test, start = summary["test"] or {}, summary.get("test_start") or {}
    best = summary.get("best") or {}
    return {
        "cell": cell.name,
        "kind": cell.kind,
        "source_fraction": "" if cell.source_fraction is None else fraction_name(cell.source_fraction),
        "target_fraction": fraction_name(cell.target_fraction),
        "seed": cell.seed,
        "mode": mode,
        "source_users": source[0],
        "source_interactions": source[1],
        "target_users": target[0],
        "target_interactions": target[1],
        **{m: test.get(f"test/full/{m}") for m in METRICS},
        "pop_ndcg@10": test.get("test/full/pop/ndcg@10"),
        "pop_hr@10": test.get("test/full/pop/hr@10"),
        "start_ndcg@10": start.get("test/full/ndcg@10"),  # zero-shot: the start, before finetuning
        "start_hr@10": start.get("test/full/hr@10"),
        **{f"{m}_{b}": test.get(f"test/full/{m}/{b}") for b in BUCKETS for m in BUCKET_METRICS},
        **{f"users_{b}": _count(test.get(f"test/users/{b}")) for b in BUCKETS},
        "trainable_params": summary["params"]["all"]["trainable"],
        "total_params": summary["params"]["all"]["total"],
        "steps": summary["steps"],
        "best_step": best.get("step"),
        "pretrain_s": pretrain_s,
        "train_s": summary["time"]["train_s"],
        "wall_s": wall_s,
        "peak_rss_gb": summary["memory"]["peak_rss_gb"],
        "cuda_max_allocated_gb": summary["memory"]["cuda_max_allocated_gb"],
        "device": device,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _count(value: float | None) -> int | None:
    return None if value is None else round(value)


def number(value: str) -> float | None:
    """A CSV cell as a float (None for an empty one)."""
    return float(value) if value != "" else None
