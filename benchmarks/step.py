"""``python -m benchmarks.step --domains FOLDER [FOLDER ...]``: what item deduplication, the machine and ZeRO give a
training step, measured side by side in one run on one machine (so the ratios compare like with like):

- dedup: training sequences/s with each distinct item of a batch encoded once (the normal batch) vs. every history
  position and target encoded separately (:func:`benchmarks.dedup.undeduplicate`); the same batches, interleaved
  (ON OFF, OFF ON, ...), forward + backward + optimizer step through the DeepSpeed engine on one rank;
- FLOP/s: the step's matmul/conv FLOPs (``torch.utils.flop_counter``, forward + backward) per second of step, as a
  fraction of the dense fp32 matmul rate measured here (2048 x 2048 ``torch.mm``, before and after the steps);
- memory (:mod:`benchmarks.zero_memory`): per rank of 2 gloo ranks, the bytes of parameters, gradients, fp32 master
  partitions and optimizer state each ZeRO stage leaves a rank holding (read from DeepSpeed's optimizer), and the
  process RSS.

``--profile`` instead: the share of a training step's time in each phase (data wait, tokenize, image decode, frozen
forward, trainable forward, backward, optimizer, logging/other), through the real engine loop on one rank
(:mod:`benchmarks.profile`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.config import TrainConfig, load_config
from shards.collate import Batch

from .common import (
    ZERO_FILES,
    add_run_arguments,
    check_domains,
    config_paths_and_overrides,
    parse_run_arguments,
    read_batches,
    say,
)
from .dedup import Undeduplicated, check_faithful, encodings, faithful, step_loss, train_step, undeduplicate
from .profile import profile_steps, report_profile
from .zero_memory import bench_memory, report_memory

# ---- timing and FLOPs -------------------------------------------------------------------------------


def matmul_flops(n: int = 2048, seconds: float = 2.0) -> float:
    """Dense fp32 FLOP/s of ``torch.mm`` on n x n matrices, with this process's threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    iters, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or iters < 2:
        torch.mm(a, b)
        iters += 1
    return 2 * n**3 * iters / elapsed


def step_flops(module: nn.Module, batch: Batch, undedup: Undeduplicated | None = None) -> int:
    """Forward + backward FLOPs of the step's loss (matmuls, convolutions, attention: what FlopCounterMode counts);
    the gradients are dropped again."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step_loss(module, batch, undedup).backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench_dedup(cfg: TrainConfig, steps: int, warmup: int, share_batches: int) -> dict[str, Any]:
    """Dedup ON vs OFF step times, FLOPs and the matmul peak, on one rank (ZeRO-0, this process); the share of
    encodings deduplication saves also over ``share_batches`` further batches (read, not trained on)."""
    from pretrain import engine as eng
    from pretrain.distributed import init_distributed

    dist = init_distributed(cfg.engine.process_group_timeout_s)
    say(f"building the model and engine ({torch.get_num_threads()} threads)")
    run = eng.build(cfg, dist)
    say(f"reading {warmup + steps} batches")
    batches = [b.to(dist.device) for b in read_batches(run.stream, warmup + steps)]
    expanded = [undeduplicate(b) for b in batches]
    module = run.engine.module
    most = max(range(len(batches)), key=lambda i: len(expanded[i].row_of_V) - len(batches[i].item_index))
    check = check_faithful(module, batches[most], expanded[most])  # the batch with the most repeated items
    check["batch"], check["repeats"] = most, len(expanded[most].row_of_V) - len(batches[most].item_index)
    say(f"faithfulness check: {check}")
    peak_before = matmul_flops()
    times: dict[str, list[float]] = {"on": [], "off": []}
    cpu_times: dict[str, list[float]] = {"on": [], "off": []}
    for i, (batch, undedup) in enumerate(zip(batches, expanded)):
        # the same batch with and without deduplication, interleaved; who goes first alternates (ON OFF, OFF ON, ...)
        # so that a drift of the machine's speed (other jobs, caches) weighs on both alike
        modes = [("on", None), ("off", undedup)][:: 1 if i % 2 == 0 else -1]
        seconds = {mode: train_step(run.engine, batch, arg) for mode, arg in modes}
        if i >= warmup:
            for mode in times:
                times[mode].append(seconds[mode][0])
                cpu_times[mode].append(seconds[mode][1])
        say(f"step {i + 1}/{warmup + steps}{'' if i >= warmup else ' (warm-up)'}: ON {seconds['on'][0]:.3f} s,"
             f" OFF {seconds['off'][0]:.3f} s")  # fmt: skip
    peak_after = matmul_flops()
    say("counting FLOPs")
    measured = list(zip(batches, expanded))[warmup:]
    flops = {"on": sum(step_flops(module, b, None) for b, _ in measured)}
    flops["off"] = sum(step_flops(module, b, u) for b, u in measured)
    sequences = sum(len(b) for b, _ in measured)
    say(f"reading {share_batches} more batches to count repeated items")
    counted = [encodings(b) for b in [*batches, *read_batches(run.stream, share_batches)]]
    return {
        "threads": torch.get_num_threads(),
        "steps": steps,
        "warmup": warmup,
        "batch_size": cfg.data.stream.batch_size,
        "check": check,
        "faithful": faithful(check),
        "sequences": sequences,
        "table_rows_dedup": sum(len(b.item_index) for b, _ in measured),
        "table_rows_undedup": sum(len(u.row_of_V) for _, u in measured),
        "share_batches": len(counted),
        "share_saved": 1 - sum(u for u, _ in counted) / sum(v for _, v in counted),
        "step_seconds": times,
        "step_cpu_seconds": cpu_times,
        "sequences_per_s": {m: sequences / sum(t) for m, t in times.items()},
        "paired_speedups": [off / on for on, off in zip(times["on"], times["off"])],
        "step_flops": flops,
        "flops_per_s": {m: flops[m] / sum(times[m]) for m in times},
        "matmul_flops_per_s": {"before": peak_before, "after": peak_after},
    }


# ---- the report ---------------------------------------------------------------------------------------


def report_dedup(r: dict[str, Any]) -> str:
    c, sps, t = r["check"], r["sequences_per_s"], r["step_seconds"]
    saved = 1 - r["table_rows_dedup"] / r["table_rows_undedup"]
    peak = max(r["matmul_flops_per_s"].values())
    lines = [
        f"Dedup: {r['steps']} steps after {r['warmup']} warm-up, batch {r['batch_size']}, {r['threads']} threads,"
        f" ON and OFF interleaved on the same batches (DeepSpeed engine, 1 rank)",
        f"  check (eval mode, batch {c['batch']}, {c['repeats']} repeated items): loss {c['loss_dedup']:.6f}"
        f" dedup, {c['loss_undedup']:.6f} un-dedup"
        f" (|diff| {abs(c['loss_dedup'] - c['loss_undedup']):.2e}); user vectors max |diff|"
        f" {c['user_vectors_max_abs_diff']:.2e}: {'faithful' if r['faithful'] else 'NOT FAITHFUL'}",
        f"  (the expanded table fed as it is, duplicates as extra negatives: loss {c['loss_expanded_as_is']:.6f})"
        if c["repeats"]
        else "  (no item repeats in the batches timed: the check is trivial here; tests/pretrain/test_bench.py)",
        f"  {'':<28} {'sequences/s':>12} {'s/step':>8} {'items encoded/step':>19}",
    ]
    for mode, rows in (("on", r["table_rows_dedup"]), ("off", r["table_rows_undedup"])):
        lines.append(f"  dedup {mode.upper():<22} {sps[mode]:>12.2f} {sum(t[mode]) / len(t[mode]):>8.3f}"
                     f" {rows / r['steps']:>19.1f}")  # fmt: skip
    paired, cpu, flops = r["paired_speedups"], r["step_cpu_seconds"], r["step_flops"]
    lines += [
        f"  ON / OFF speed-up            {sps['on'] / sps['off']:>12.2f}x   (per batch: median"
        f" {statistics.median(paired):.2f}x, range {min(paired):.2f}-{max(paired):.2f}x)",
        f"  ON / OFF by CPU time         {sum(cpu['off']) / sum(cpu['on']):>12.2f}x   by FLOPs"
        f" {flops['off'] / flops['on']:.2f}x (what a compute-bound step would gain)",
        f"  encodings saved by dedup     {saved:>12.1%}   (over {r['share_batches']} batches: {r['share_saved']:.1%})",
        "",
        "FLOP/s (matmul/conv/attention FLOPs of forward + backward, per second of the whole step):",
        f"  dense fp32 mm 2048^2: {r['matmul_flops_per_s']['before'] / 1e9:.1f} GFLOP/s before the steps,"
        f" {r['matmul_flops_per_s']['after'] / 1e9:.1f} after; peak = {peak / 1e9:.1f}",
    ]
    for mode in ("on", "off"):
        per_step, rate = r["step_flops"][mode] / r["steps"], r["flops_per_s"][mode]
        lines.append(f"  dedup {mode.upper():<4} {per_step / 1e9:>9.2f} GFLOP/step {rate / 1e9:>8.2f} GFLOP/s"
                     f" = {rate / peak:6.1%} of peak")  # fmt: skip
    return "\n".join(lines)


# ---- the command ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.step",
        description="Benchmark a training step: deduplication ON vs OFF, achieved vs. measured matmul FLOP/s, and "
        "per-rank memory of ZeRO 0 / 2 / 3 with 2 ranks, side by side in one run.",
        epilog="Overrides (section.field=value) may also follow --domains: those arguments are not folders.",
    )
    add_run_arguments(p)
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first (default 1)")
    p.add_argument("--share-batches", type=int, default=30, help="further batches read (not trained on) to "
                   "measure the share of encodings deduplication saves (default 30)")  # fmt: skip
    p.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3], choices=[0, 1, 2, 3],
                   help="ZeRO stages of the memory table (default 0 2 3)")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch threads of the dedup and FLOP/s measurements "
                   "(default 0: torch's default; the ZeRO ranks always use 1 each)")  # fmt: skip
    p.add_argument("--skip-memory", action="store_true", help="leave out the ZeRO memory runs")
    p.add_argument("--profile", action="store_true", help="instead: the share of a training step's time in each "
                   "phase, over --steps steps after --warmup, data read in this process")  # fmt: skip
    p.add_argument("--json", metavar="OUT", help="also write the measurements to this JSON file")
    return parse_run_arguments(p, argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    check_domains(args.domains)
    if args.steps < 1 or min(args.warmup, args.share_batches, args.threads) < 0:
        raise ValueError("--steps must be >= 1, --warmup, --share-batches and --threads >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    paths, overrides = config_paths_and_overrides(args)
    if args.profile:
        profiled = profile_steps(paths, overrides, args.steps, args.warmup)
        print(report_profile(profiled), flush=True)
        return {"config": paths, "overrides": args.overrides, "domains": args.domains, "profile": profiled}
    cfg = load_config([*paths, str(ZERO_FILES[0])], overrides)  # one rank: ZeRO-0 is the step itself
    result: dict[str, Any] = {"config": paths, "overrides": args.overrides, "domains": args.domains}
    result["dedup"] = bench_dedup(cfg, args.steps, args.warmup, args.share_batches)
    print(report_dedup(result["dedup"]), flush=True)
    if not args.skip_memory:
        result["memory"] = bench_memory(paths, overrides, args.stages)
        print("\n" + report_memory(result["memory"]), flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except ValueError as e:  # bad input or config: the message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from pretrain.distributed import shutdown

            shutdown()  # through DeepSpeed, which drops its handles too (a later run in this process starts anew)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0 if "dedup" not in result or result["dedup"]["faithful"] else 1


if __name__ == "__main__":
    sys.exit(main())
