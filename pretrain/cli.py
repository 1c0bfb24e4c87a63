"""The command-line pieces that ``python -m pretrain``, ``python -m finetune`` and ``python -m finetune.scaling``
share: the layered config arguments, the launcher's arguments, and logging."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_config_arguments(
    p: argparse.ArgumentParser,
    *,
    files: str = "TOML (or saved JSON) config",
    example: str = "",
    keys: str = "section.field",
    described: str = "every config key",
) -> None:
    """``--config FILE`` (repeatable, later files win), positional ``KEYS=value`` overrides (applied last) and
    ``--help-config`` (describe ``described`` and exit)."""
    example = f" ({example})" if example else ""
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help=f"{files}; repeat to layer files, later ones win{example}")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar=f"{keys}=value", help="overrides, applied last")
    p.add_argument("--help-config", action="store_true", help=f"describe {described} and exit")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """``--resume``, ``--force-unlock``, ``--print-config`` and the ``--local_rank`` that the deepspeed launcher
    appends (accepted and ignored: the rank comes from the environment)."""
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run.out_dir "
                   "(same as run.resume=true; starts afresh when there is none yet)")  # fmt: skip
    p.add_argument("--force-unlock", action="store_true", help="take run.out_dir's lock even though another run "
                   "holds it: for a run on another host that died (same as run.force_unlock=true)")  # fmt: skip
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides of the command line: the positional ones, then those of --resume and --force-unlock."""
    flags = {"run.resume=true": args.resume, "run.force_unlock=true": args.force_unlock}
    return [*args.overrides, *(item for item, given in flags.items() if given)]


def setup_logging() -> None:
    """INFO on rank 0 (RANK unset counts as 0), WARNING on the other ranks, with times."""
    rank0 = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING, format=LOG_FORMAT, datefmt="%H:%M:%S")


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Only errors from the loggers ``names`` inside the block (their levels restored after it)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
