"""The GPU check's report (run by launch/gpu_check.sh): the measured bf16 matmul rate of this GPU, the FLOPs of one
training step of the checked config, and each run's throughput from its metrics.jsonl, as one JSON document.

    python -m benchmarks.gpu_report --runs RUN_DIR [RUN_DIR ...] --config FILE [--config FILE] [overrides...]

sequences/s and items encoded/s are the median of the runs' logged ``perf/`` values after the first log line (which
holds start-up); FLOP/s is that sequences/s times the FLOPs per sequence of one step of the config (forward +
backward, counted by ``torch.utils.flop_counter`` on a batch of its stream), as a share of the bf16 dense matmul
rate measured here (8192 x 8192 ``torch.mm``). Without CUDA it measures the CPU's fp32 rate instead and says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 2.0) -> float:
    """Dense FLOP/s of ``torch.mm`` on n x n random matrices."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    iters, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or iters < 3:
        torch.mm(a, b)
        iters += 1
        if iters % 10 == 0:
            sync()
    sync()
    elapsed = time.perf_counter() - start
    return 2 * n**3 * iters / elapsed


def flops_per_sequence(config: list[str], overrides: list[str], device: torch.device) -> float:
    """Forward + backward FLOPs of one step of the config's first batch, per sequence of that batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.config import load_config
    from pretrain.model import Catalog, Recommender
    from shards.stream import SequenceStream

    cfg = load_config(config, [*overrides, "data.stream.num_workers=0"])
    batch = next(iter(SequenceStream(cfg.data.domains, cfg.data.stream, rank=0, world_size=1))).to(device)
    model = Recommender(cfg.model, cfg.loss, Catalog.from_folders(cfg.data.domains)).to(device).train()
    with FlopCounterMode(display=False) as counter:
        model(batch).loss.backward()
    return counter.get_total_flops() / len(batch)


def run_throughput(run: Path) -> dict[str, object]:
    """Median sequences/s and items encoded/s over a run's logged steps, the first log line left out."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    perf = [r for r in rows if "perf/sequences_per_s" in r][1:]
    if not perf:
        return {"logged": 0}
    return {
        "logged": len(perf),
        "sequences_per_s": statistics.median(r["perf/sequences_per_s"] for r in perf),
        "items_encoded_per_s": statistics.median(r["perf/items_encoded_per_s"] for r in perf),
        "last_losses": {k: v for k, v in perf[-1].items() if k.startswith("loss/")},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, type=Path, help="run.out_dir of each checked pretraining")
    p.add_argument("--config", action="append", default=[], help="the runs' config files (for the FLOP count)")
    p.add_argument("overrides", nargs="*", help="the runs' overrides (for the FLOP count)")
    args = p.parse_intermixed_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    peak = matmul_rate(device, dtype, 8192 if cuda else 1024)
    per_seq = flops_per_sequence(args.config, args.overrides, device)
    report: dict[str, object] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "peak_matmul_flops": peak,
        "peak_dtype": str(dtype),
        "flops_per_sequence": per_seq,
        "runs": {},
    }
    for run in args.runs:
        t = run_throughput(run)
        if "sequences_per_s" in t:
            t["flops_per_s"] = t["sequences_per_s"] * per_seq
            t["share_of_peak"] = t["flops_per_s"] / peak
        report["runs"][run.name] = t  # type: ignore[index]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
