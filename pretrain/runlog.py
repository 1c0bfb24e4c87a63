"""The run's metrics: the loop's window of steps measured, reduced over ranks, and written by rank 0.

What a run writes into its ``run.out_dir``: TensorBoard scalars and text in ``tb/`` and one JSON line per write in
``metrics.jsonl`` (``{"step": ..., name: value, ...}``, exact floats), through one :class:`RunLog`; the training
engine and finetuning's summary both write with it. :class:`Meter` and :func:`window_metrics` make the training's
rows (losses, throughput, memory, the stream's counters); :func:`memory_gb` is the memory probe.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from shards.stream import STATS

COUNT_KEYS = ("sequences", "positions", "items")
"""Keys of ModelOutput.logs that are batch counts, not losses."""
STREAM_STATS = STATS
"""The stream's counters, summed over ranks: ``data/*`` in TensorBoard and in the end-of-run summary."""


class RunLog:
    """Rank 0's writer of a run's metrics into ``out_dir``: TensorBoard (``tb/``) and ``metrics.jsonl``.
    ``purge_step``: TensorBoard drops the events a crashed run logged from that step on (a resumed run's)."""

    def __init__(self, out_dir: str | os.PathLike, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir = Path(out_dir)
        self.tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=purge_step)

    def write(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalars at ``step``: to TensorBoard (flushed), and one line of metrics.jsonl."""
        for tag, value in metrics.items():
            self.tb.add_scalar(tag, value, step)
        self.tb.flush()
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def text(self, tag: str, text: str, step: int) -> None:
        """A text panel in TensorBoard."""
        self.tb.add_text(tag, text, step)

    def close(self) -> None:
        self.tb.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def logged_values(out_dir: str | os.PathLike, key: str, up_to: int) -> dict[int, float]:
    """Step -> value of ``key`` in ``out_dir``'s metrics.jsonl, for the steps up to ``up_to`` (the rows a crashed run
    wrote after the checkpoint it is resumed from are left out; of a step written twice, the last row counts)."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    values: dict[int, float] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if key in row and row["step"] <= up_to:
            values[row["step"]] = row[key]
    return values


def memory_gb(device: torch.device | None = None) -> dict[str, float]:
    """This process's memory in GB: ``mem/rss_gb`` (resident now), ``mem/peak_rss_gb``, and on CUDA (``device``'s
    type; None: the current device when there is one) ``mem/cuda_max_allocated_gb``."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    out = {"mem/rss_gb": current / 1e9, "mem/peak_rss_gb": peak / 1e9}
    if (device.type == "cuda") if device is not None else torch.cuda.is_available():
        out["mem/cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


class Meter:
    """Sums of the model's logs over the micro-batches since the last log, on this rank, and the training time they
    took: the wall time since the last log less what validations and checkpoints took (:meth:`exclude`), so the
    throughput after a validation is the training's."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.sums: Counter = Counter()
        self.micro_batches = 0
        self.start = time.perf_counter()
        self.excluded = 0.0

    def add(self, logs: dict[str, float]) -> None:
        self.sums.update(logs)
        self.micro_batches += 1

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` of other work (a validation, a checkpoint) out of the training time."""
        self.excluded += seconds

    def elapsed(self) -> float:
        """Training seconds since the last log (never 0)."""
        return max(time.perf_counter() - self.start - self.excluded, 1e-9)


def _reduce(values: list[float], device: torch.device, op: Any) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=op)
    return t.tolist()


def window_metrics(
    meter: Meter, stream_stats: Mapping[str, int], device: torch.device, train: Mapping[str, float]
) -> dict[str, float]:
    """The metrics of the steps since the last log (every rank must call it): ``loss/*`` averaged over micro-batches
    and ranks, then ``train`` (the optimizer's rates and gradient norm, as given), ``perf/*`` throughput,
    ``mem/*`` (the largest over ranks) and the stream's ``data/*`` counters summed over ranks."""
    loss_keys = sorted(k for k in meter.sums if k not in COUNT_KEYS)
    local = [meter.sums[k] for k in loss_keys] + [meter.sums[k] for k in COUNT_KEYS] + [meter.micro_batches]
    local += [stream_stats[k] for k in STREAM_STATS]
    summed = _reduce(local, device, torch.distributed.ReduceOp.SUM)
    probe = memory_gb(device)
    memory = dict(zip(probe, _reduce(list(probe.values()), device, torch.distributed.ReduceOp.MAX)))
    elapsed = meter.elapsed()
    n = len(loss_keys)
    micro = summed[n + len(COUNT_KEYS)]
    counts = dict(zip(COUNT_KEYS, summed[n : n + len(COUNT_KEYS)]))
    metrics = {f"loss/{k}": v / micro for k, v in zip(loss_keys, summed[:n])}
    metrics.update(train)
    metrics["perf/sequences_per_s"] = counts["sequences"] / elapsed
    metrics["perf/items_encoded_per_s"] = counts["items"] / elapsed
    metrics["perf/dedup_saved"] = 1 - counts["items"] / max(counts["positions"], 1)
    metrics.update(memory)
    stats = summed[n + len(COUNT_KEYS) + 1 :]
    metrics.update({f"data/{k}": v for k, v in zip(STREAM_STATS, stats)})
    return metrics
