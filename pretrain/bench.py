"""``python -m pretrain.bench --domains FOLDER [FOLDER ...]``: what item deduplication, the machine and ZeRO give a
training step, measured side by side in one run on one machine (so the ratios compare like with like):

- dedup: training sequences/s with each distinct item of a batch encoded once (the normal batch) vs. every history
  position and target encoded separately (:func:`undeduplicate`); the same batches, interleaved (ON OFF, OFF ON,
  ...), forward + backward + optimizer step through the DeepSpeed engine on one rank;
- FLOP/s: the step's matmul/conv FLOPs (``torch.utils.flop_counter``, forward + backward) per second of step, as a
  fraction of the dense fp32 matmul rate measured here (2048 x 2048 ``torch.mm``, before and after the steps);
- memory (:mod:`pretrain.zero_memory`): per rank of 2 gloo ranks, the bytes of parameters, gradients, fp32 master
  partitions and optimizer state each ZeRO stage leaves a rank holding (read from DeepSpeed's optimizer), and the
  process RSS.

``--profile`` instead: the share of a training step's time in each phase (data wait, tokenize, image decode, frozen
forward, trainable forward, backward, optimizer, logging/other), through the real engine loop on one rank
(:mod:`pretrain.profile`).

Shape legend::

    B sequences   L positions   U distinct items of the batch (the table's rows)   D model width
    V rows of the un-deduplicated table: one per real history position, then one per target
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shards.collate import Batch

from .config import TrainConfig, load_config
from .model import ItemEmbeddings

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "launch/configs/small_cpu.toml"
ZERO_FILES = {stage: REPO / f"launch/ds/zero{stage}.toml" for stage in (0, 1, 2, 3)}


# ---- the un-deduplicated batch ----------------------------------------------------------------------


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


def train_step(engine: Any, batch: Batch, undedup: Undeduplicated | None) -> tuple[float, float]:
    """(wall, CPU) seconds of one training step (CPU time: of all this process's threads)."""
    start, cpu = time.perf_counter(), time.process_time()
    loss = step_loss(engine, batch, undedup)
    engine.backward(loss)
    engine.step()
    return time.perf_counter() - start, time.process_time() - cpu


def read_batches(stream: Any, n: int) -> list[Batch]:
    """The stream's first ``n`` batches, going on into later epochs when one epoch has fewer."""
    out: list[Batch] = []
    while len(out) < n:
        if len(stream) == 0:
            raise ValueError("the stream has no batch: fewer sequences than data.stream.batch_size x workers")
        with contextlib.closing(iter(stream)) as batches:  # closing stops the DataLoader workers now
            out += itertools.islice(batches, n - len(out))
        if stream.batches_done >= len(stream):
            stream.set_epoch(stream.epoch + 1)
    return out


def encodings(batch: Batch) -> tuple[int, int]:
    """(distinct items, item occurrences: real history positions plus targets) of ``batch``."""
    targets = 0 if batch.target is None else len(batch.target)
    return len(batch.item_index), int(batch.seq_mask.sum()) + targets


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def bench_dedup(cfg: TrainConfig, steps: int, warmup: int, share_batches: int) -> dict[str, Any]:
    """Dedup ON vs OFF step times, FLOPs and the matmul peak, on one rank (ZeRO-0, this process); the share of
    encodings deduplication saves also over ``share_batches`` further batches (read, not trained on)."""
    from . import engine as eng

    dist = eng.init_distributed(cfg.engine.process_group_timeout_s)
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


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.bench",
        description="Benchmark a training step: deduplication ON vs OFF, achieved vs. measured matmul FLOP/s, and "
        "per-rank memory of ZeRO 0 / 2 / 3 with 2 ranks, side by side in one run.",
        epilog="Overrides (section.field=value) may also follow --domains: those arguments are not folders.",
    )
    p.add_argument("--domains", nargs="+", required=True, metavar="FOLDER", help="built domain folders "
                   "(python -m shards build); they replace data.domains")  # fmt: skip
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help=f"TOML config, repeat to layer (default: {DEFAULT_CONFIG.relative_to(REPO)})")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides, applied last")
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
    args = p.parse_intermixed_args(argv)
    moved = [d for d in args.domains if _OVERRIDE.match(d) and not Path(d).exists()]
    args.domains = [d for d in args.domains if d not in moved]
    args.overrides = [*args.overrides, *moved]
    return args


def _check_domains(folders: Sequence[str]) -> None:
    for folder in folders:
        if not (Path(folder) / "manifest.json").is_file():
            what = "does not exist" if not Path(folder).exists() else "has no manifest.json"
            raise ValueError(f"domain folder {folder} {what} (build it with: python -m shards build ...)")
    if not folders:
        raise ValueError("--domains needs at least one built domain folder")


def run(args: argparse.Namespace) -> dict[str, Any]:
    _check_domains(args.domains)
    if args.steps < 1 or min(args.warmup, args.share_batches, args.threads) < 0:
        raise ValueError("--steps must be >= 1, --warmup, --share-batches and --threads >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = [str(p) for p in args.config] or [str(DEFAULT_CONFIG)]
    overrides = [f"data.domains={json.dumps([str(Path(d).resolve()) for d in args.domains])}",
                 "engine.process_group_timeout_s=600", *args.overrides]  # fmt: skip
    if args.profile:
        from .profile import profile_steps, report_profile

        profiled = profile_steps(paths, overrides, args.steps, args.warmup)
        print(report_profile(profiled), flush=True)
        return {"config": paths, "overrides": args.overrides, "domains": args.domains, "profile": profiled}
    cfg = load_config([*paths, str(ZERO_FILES[0])], overrides)  # one rank: ZeRO-0 is the step itself
    result: dict[str, Any] = {"config": paths, "overrides": args.overrides, "domains": args.domains}
    result["dedup"] = bench_dedup(cfg, args.steps, args.warmup, args.share_batches)
    print(report_dedup(result["dedup"]), flush=True)
    if not args.skip_memory:
        from .zero_memory import bench_memory, report_memory  # spawns ranks that import this module

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
            from .engine import shutdown

            shutdown()  # through DeepSpeed, which drops its handles too (a later run in this process starts anew)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0 if "dedup" not in result or result["dedup"]["faithful"] else 1


if __name__ == "__main__":
    sys.exit(main())
