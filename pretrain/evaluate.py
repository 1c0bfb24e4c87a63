"""``python -m pretrain.evaluate --model EXPORT --data DIR``: full-ranking evaluation of an exported model.

The protocol, the metric names and the buckets are :mod:`pretrain.ranking`'s (the project's one ranking
implementation, which the engine's validation runs too); this module is the command around it: arguments, one
process or several (torchrun), the JSON file beside the model, TensorBoard and the printed table.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from shards import schema
from shards.errors import InputError

from .catalog import ENCODE_CHUNK
from .cli import setup_logging
from .distributed import init_distributed, rank, shutdown
from .export import EXPORT_CONFIG, EXPORT_WEIGHTS, load_pretrained
from .metrics import (
    BUCKETS,
    KS,
    METRICS,
    SCORE_CHUNK,
)
from .outputs import write_json
from .ranking import SPLIT_CHOICES, DomainResult, EvalOptions, evaluate_domain, model_for_domain

log = logging.getLogger(__name__)


# ---- the command ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.evaluate",
        description="Leave-one-out evaluation of an exported model over each domain's whole catalog "
        "(HR, NDCG, MRR @ 1, 5, 10, 20, 50; a popularity ranker as the floor; breakdowns by target popularity "
        "and modality). Several processes: torchrun --nproc_per_node N -m pretrain.evaluate ...",
    )
    p.add_argument("--model", required=True, metavar="EXPORT", help="an export folder (config.json + "
                   "model.safetensors, e.g. runs/x/model)")  # fmt: skip
    p.add_argument("--data", required=True, nargs="+", metavar="SHARDS", help="built domain folder(s)")
    p.add_argument("--split", choices=sorted(SPLIT_CHOICES), default="both", help="held-out target(s) to rank")
    p.add_argument("--users", type=_non_negative, default=0, help="users per split (0: all; else the first N in "
                   "a seeded shard order)")  # fmt: skip
    p.add_argument("--batch-size", type=_positive, default=64, help="users scored together (per rank)")
    p.add_argument("--chunk", type=_positive, default=SCORE_CHUNK, help="catalog items scored per block")
    p.add_argument("--encode-chunk", type=_positive, default=ENCODE_CHUNK, help="catalog items encoded per call")
    p.add_argument("--sampled", type=_non_negative, default=0, metavar="N", help="also rank against N sampled "
                   "negatives per user (names sampled<N>/...)")  # fmt: skip
    p.add_argument("--seed", type=_non_negative, default=0, help="seed of the tie order, negatives and users")
    p.add_argument("--allow-partial", action="store_true", help="report a result over fewer users than the "
                   "manifest promises (bad samples, a cut shard) with a warning, not an error")  # fmt: skip
    p.add_argument("--out", metavar="FILE.json", help="results file ('{domain}' is replaced by the domain name; "
                   "needed with several domains); default EXPORT/eval-{domain}.json")  # fmt: skip
    p.add_argument("--tb", metavar="DIR", help="also write TensorBoard scalars to DIR/<domain>")
    p.add_argument("--step", type=_non_negative, default=0, help="step of the TensorBoard scalars")
    p.add_argument("--timeout-s", type=_positive, default=1800, help="seconds a rank waits for the others "
                   "in a collective (several processes)")  # fmt: skip
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu; per rank under torchrun)")
    return p.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def check_export(folder: str | Path) -> Path:
    """``folder`` as a Path if it holds an export's two files; a clear error otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such model folder")
    missing = [name for name in (EXPORT_CONFIG, EXPORT_WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise InputError(f"{folder}: not a momrec export (no {' or '.join(missing)}; exports are written to "
                         "run.out_dir/model)")  # fmt: skip
    return folder


def result_document(result: DomainResult, model: Path, domain_index: int, in_catalog: bool, opts: EvalOptions) -> dict:
    return {
        "format": "momrec-eval",
        "version": 1,
        "model": str(model.resolve()),
        "data": str(Path(result.folder).resolve()),
        "domain": result.domain,
        "domain_index": domain_index,
        "in_catalog": in_catalog,
        "items": result.n_items,
        "options": dataclasses.asdict(opts),
        "ks": list(KS),
        "buckets": result.buckets,
        "bad_samples": result.bad_samples,
        "users_expected": result.users_expected,
        "partial": any(t.users[0] < result.users_expected for t in result.tallies.values()),
        "metrics": result.metrics(),
        "per_user": {split: tally.user_ranks() for split, tally in result.tallies.items()},
    }


def format_table(result: DomainResult, rankings: Sequence[str]) -> str:
    """Per split: every metric by ranking, then NDCG@10 by bucket of the target (with its users)."""
    lines = [f"{result.domain}: {result.n_items} items ({result.folder})"]
    head = "".join(f"{r:>16}" for r in rankings)
    for split, tally in result.tallies.items():
        lines.append(f"  {split}: {int(tally.users[0])} users".ljust(24) + " " * 7 + head)
        for metric in METRICS:
            for k in KS:
                cells = "".join(f"{tally.mean(r, metric, k):16.4f}" for r in rankings)
                lines.append(f"    {metric}@{k}".ljust(31) + cells)
        lines.append("  ndcg@10 by target".ljust(24) + "  users" + head)
        for q, bucket in enumerate(BUCKETS[1:], start=1):
            users = int(tally.users[q])
            cells = "".join(f"{tally.mean(r, 'ndcg', 10, bucket):16.4f}" for r in rankings) if users else ""
            lines.append(f"    {bucket}".ljust(24) + f"{users:7d}" + cells)
    return "\n".join(lines)


def _write_tensorboard(folder: Path, metrics: dict[str, float], step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    try:
        for name, value in metrics.items():
            writer.add_scalar(name, value, step)
    finally:
        writer.close()


def _out_path(args: argparse.Namespace, model: Path, domain: str) -> Path:
    return Path(args.out.replace("{domain}", domain)) if args.out else model / f"eval-{domain}.json"


def run(args: argparse.Namespace) -> list[DomainResult]:
    """Evaluate every ``--data`` folder (all ranks), write and print the results (rank 0)."""
    folder = check_export(args.model)
    manifests = [schema.load_manifest(f) for f in args.data]  # every folder checked before the long part
    names = [m.domain for m in manifests]
    if len(set(names)) != len(names):
        raise InputError(f"--data names a domain twice: {names}")
    if args.out and len(names) > 1 and "{domain}" not in args.out:
        raise InputError("--out needs '{domain}' in its name when several domains are evaluated")
    started = not torch.distributed.is_initialized()
    dist = init_distributed(args.timeout_s, deepspeed=False)  # a group only under a launcher with several ranks
    started = started and torch.distributed.is_initialized()
    try:
        device = torch.device(args.device) if args.device else dist.device
        model, cfg, catalog = load_pretrained(folder, device)
        opts = EvalOptions(SPLIT_CHOICES[args.split], args.users, args.batch_size, args.chunk, args.encode_chunk,
                           args.sampled, args.seed, allow_partial=args.allow_partial)  # fmt: skip
        results = []
        for data, manifest in zip(args.data, manifests):
            domain_model, domain = model_for_domain(model, cfg, manifest)
            in_catalog = domain < len(catalog.domains)
            if not in_catalog:
                log.info("%s: domain %r is not in the model's catalog: ranked by content", data, manifest.domain)
            result = evaluate_domain(domain_model, data, domain, cfg.data.stream, opts)
            results.append(result)
            if rank() == 0:
                _report(args, folder, result, domain, in_catalog, opts)
        return results
    finally:
        if started:
            shutdown()


def _report(
    args: argparse.Namespace, model: Path, result: DomainResult, domain: int, in_catalog: bool, opts: EvalOptions
) -> None:
    path = _out_path(args, model, result.domain)
    write_json(path, result_document(result, model, domain, in_catalog, opts))
    if args.tb:
        _write_tensorboard(Path(args.tb) / result.domain, result.metrics(), args.step)
    print(format_table(result, opts.rankings))
    print(f"  -> {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        run(args)
    except ValueError as e:  # bad input (InputError is one too): the message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
