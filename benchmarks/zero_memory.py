"""``python -m benchmarks.zero_memory --domains FOLDER [FOLDER ...]`` (also the memory part of ``python -m
benchmarks.step``): per rank of 2 gloo ranks, the bytes of parameters, gradients, fp32 master partitions and optimizer
state that each ZeRO stage leaves a rank holding (read from DeepSpeed's optimizer), and the process RSS."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pretrain.config import load_config

from .common import (
    ZERO_FILES,
    add_run_arguments,
    check_domains,
    config_paths_and_overrides,
    parse_run_arguments,
    read_batches,
    say,
)
from .dedup import train_step

MEMORY_KEYS = ("params", "grads", "master", "optimizer", "total")


class _Spans:
    """Byte ranges already counted, so a tensor seen twice (a view, a shared flat buffer) counts once."""

    def __init__(self) -> None:
        self.spans: list[tuple[int, int]] = []

    def claim(self, tensors: Sequence[torch.Tensor]) -> int:
        new = 0
        for t in tensors:
            start = t.data_ptr()
            end = start + t.numel() * t.element_size()
            pieces = [(start, end)]
            for a, b in self.spans:  # subtract what is already counted
                pieces = [p for lo, hi in pieces for p in ((lo, min(hi, a)), (max(lo, b), hi)) if p[0] < p[1]]
            new += sum(hi - lo for lo, hi in pieces)
            self.spans += pieces
        return new


def _tensors(x: Any) -> list[torch.Tensor]:
    """The tensors inside ``x`` (a tensor, or lists / dicts of them)."""
    if isinstance(x, torch.Tensor):
        return [x] if x.numel() else []
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def held_tensors(engine: Any) -> dict[str, list[torch.Tensor]]:
    """What a rank holds, by kind: its parameters (ZeRO-3: its partitions ``ds_tensor``, plus the full tensors
    of parameters kept whole), gradients (``.grad``, ZeRO's partitioned gradient buffers), fp32 master partitions
    (ZeRO-1/2 ``single_partition_of_fp32_groups``, ZeRO-3 ``fp32_partitioned_groups_flat``) and the inner
    optimizer's state (AdamW's moments)."""
    opt = engine.optimizer
    params = list(engine.module.parameters())
    masters = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")
    master = _tensors([getattr(opt, name, []) for name in masters])
    grads = [p.grad for p in params + master if p.grad is not None]
    for name in ("averaged_gradients", "grad_partitions_flat_buffer", "fp32_groups_gradients_flat"):
        grads += _tensors(getattr(opt, name, None))
    inner = getattr(opt, "optimizer", opt)
    return {
        "params": [t for p in params for t in (getattr(p, "ds_tensor", None), p.data) if t is not None and t.numel()],
        "grads": grads,
        "master": master,
        "optimizer": _tensors(list(inner.state.values())),
    }


def held_bytes(engine: Any) -> dict[str, int]:
    """Bytes per kind of :func:`held_tensors`, each byte counted once (in the first kind that holds it: ZeRO-3
    in fp32 updates its flat parameter partitions in place, so its master weights count as parameters)."""
    spans = _Spans()
    out = {kind: spans.claim(ts) for kind, ts in held_tensors(engine).items()}
    out["total"] = sum(out.values())
    return out


def _rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process: VmRSS and VmHWM (getrusage's ru_maxrss would not do: it
    survives the exec of a spawned process, which then reports its parent's peak)."""
    with open("/proc/self/status") as f:
        kib = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f) if k in ("VmRSS", "VmHWM")}
    return kib["VmRSS"] * 1024, kib["VmHWM"] * 1024


def memory_worker(rank: int, world: int, port: int, paths: list[str], overrides: list[str], out: str) -> None:
    """One rank of a ZeRO memory run (``torch.multiprocessing`` entry point): build as ``pretrain.engine.build``
    does, take one step (so optimizer state exists), then forward + backward of a second and measure."""
    torch.set_num_threads(1)  # two ranks on a shared machine: one thread each (see DESIGN's known pitfalls)
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated")  # DeepSpeed's calls
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")  # fmt: skip
    from pretrain import engine as eng
    from pretrain.distributed import init_distributed

    cfg = load_config(paths, overrides)
    dist = init_distributed(cfg.engine.process_group_timeout_s)
    run = eng.build(cfg, dist)
    batches = iter(read_batches(run.stream, 2))
    train_step(run.engine, next(batches), None)
    out_ = run.engine(next(batches), run.gather)
    run.engine.backward(out_.loss)
    buckets = _tensors([getattr(b, "buffer", None) for b in getattr(run.engine.optimizer, "ipg_buckets", {}).values()])
    result = {"bytes": held_bytes(run.engine), "rss": _rss()}
    result["bucket_bytes"] = sum(t.numel() * t.element_size() for t in buckets)
    module = run.engine.module
    result["parameters"] = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    result["trainable"] = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad)
    run.engine.step()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_memory(paths: list[str], overrides: list[str], stages: Sequence[int], world: int = 2) -> dict[str, Any]:
    """Per-rank memory of each ZeRO stage: ``world`` fresh processes per stage."""
    import torch.multiprocessing as mp

    results: dict[str, Any] = {}
    for stage in stages:
        say(f"ZeRO-{stage}: {world} ranks")
        with tempfile.TemporaryDirectory() as tmp:
            layered = [*paths, str(ZERO_FILES[stage])]
            args = (world, _free_port(), layered, [*overrides, "data.stream.num_workers=0"], tmp)
            mp.start_processes(memory_worker, args=args, nprocs=world, start_method="spawn")
            results[str(stage)] = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    return results


# ---- the report ---------------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def report_memory(results: dict[str, Any]) -> str:
    head = f"  {'stage':<7}{'rank':>4} " + "".join(f"{k:>11}" for k in MEMORY_KEYS) + f"{'RSS':>9}{'peak RSS':>10}"
    any_rank = next(iter(results.values()))[0]
    lines = [
        f"Memory per rank, MiB (2 ranks; {any_rank['parameters'] / 1e6:.2f} M parameters,"
        f" {any_rank['trainable'] / 1e6:.2f} M trainable), measured after the second step's backward:",
        head,
    ]
    for stage, ranks in results.items():
        for rank, r in enumerate(ranks):
            b, (rss, peak) = r["bytes"], r["rss"]
            lines.append(f"  ZeRO-{stage:<2}{rank:>4} " + "".join(f"{_mib(b[k]):>11}" for k in MEMORY_KEYS)
                         + f"{_mib(rss):>9}{_mib(peak):>10}")  # fmt: skip
    for stage, ranks in results.items():
        if ranks[0]["bucket_bytes"]:
            lines.append(f"  ZeRO-{stage} also allocates {_mib(ranks[0]['bucket_bytes'])} MiB of gradient-reduction"
                         " buckets per rank (torch.empty: resident only where written; not in total)")  # fmt: skip
    if "0" in results:
        base = results["0"][0]
        lines.append("  ratios to ZeRO-0 (rank 0):")
        for stage, ranks in results.items():
            b, base_b = ranks[0]["bytes"], base["bytes"]
            ratios = ", ".join(f"{k} {b[k] / base_b[k]:.2f}x" if base_b[k] else f"{k} -" for k in MEMORY_KEYS)
            lines.append(f"    ZeRO-{stage}: {ratios}, RSS {ranks[0]['rss'][0] / base['rss'][0]:.2f}x")
    return "\n".join(lines)


# ---- the command ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.zero_memory",
        description="Per-rank memory of each ZeRO stage with 2 gloo ranks, measured after the second step's backward.",
        epilog="Overrides (section.field=value) may also follow --domains: those arguments are not folders.",
    )
    add_run_arguments(p)
    p.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3], choices=[0, 1, 2, 3],
                   help="ZeRO stages of the memory table (default 0 2 3)")  # fmt: skip
    p.add_argument("--json", metavar="OUT", help="also write the measurements to this JSON file")
    args = parse_run_arguments(p, argv)
    try:
        check_domains(args.domains)
    except ValueError as e:  # bad input: the message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths, overrides = config_paths_and_overrides(args)
    result = {"config": paths, "overrides": args.overrides, "domains": args.domains}
    result["memory"] = bench_memory(paths, overrides, args.stages)
    print(report_memory(result["memory"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
