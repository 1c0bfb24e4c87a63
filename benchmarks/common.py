"""What the step benchmarks share: the repository's config files, the command line's domains and overrides, the
batches read from a stream, and progress lines."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shards.collate import Batch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "launch/configs/small_cpu.toml"
ZERO_FILES = {stage: REPO / f"launch/ds/zero{stage}.toml" for stage in (0, 1, 2, 3)}
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


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


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """--domains, --config and the config overrides (``section.field=value``)."""
    p.add_argument("--domains", nargs="+", required=True, metavar="FOLDER", help="built domain folders "
                   "(python -m shards build); they replace data.domains")  # fmt: skip
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help=f"TOML config, repeat to layer (default: {DEFAULT_CONFIG.relative_to(REPO)})")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides, applied last")


def parse_run_arguments(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parsed arguments; overrides given after --domains (which takes them for folders) go back to the overrides."""
    args = p.parse_intermixed_args(argv)
    moved = [d for d in args.domains if _OVERRIDE.match(d) and not Path(d).exists()]
    args.domains = [d for d in args.domains if d not in moved]
    args.overrides = [*args.overrides, *moved]
    return args


def check_domains(folders: Sequence[str]) -> None:
    for folder in folders:
        if not (Path(folder) / "manifest.json").is_file():
            what = "does not exist" if not Path(folder).exists() else "has no manifest.json"
            raise ValueError(f"domain folder {folder} {what} (build it with: python -m shards build ...)")
    if not folders:
        raise ValueError("--domains needs at least one built domain folder")


def config_paths_and_overrides(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The config files (default: small_cpu.toml) and the overrides: the domains, a 600 s process-group timeout,
    then the command line's."""
    paths = [str(p) for p in args.config] or [str(DEFAULT_CONFIG)]
    overrides = [f"data.domains={json.dumps([str(Path(d).resolve()) for d in args.domains])}",
                 "engine.process_group_timeout_s=600", *args.overrides]  # fmt: skip
    return paths, overrides
