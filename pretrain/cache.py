"""``python -m pretrain.cache list|prune``: the disk store of frozen-encoder features (:mod:`pretrain.feature_store`).

``list`` shows each entry (one frozen bottom on one domain's items): its tower, domain, stored items out of the
catalog's, model and split, size and last use. ``prune`` removes entries not used for ``--older-than DAYS`` days, or
``--all`` of them, and the temporary files of writers that were killed; a process that needs a removed entry
recomputes it.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .feature_prune import EntryInfo, list_entries, prune
from .feature_store import feature_dir

DAY_S = 86400.0
DESCRIPTION = """\
The disk cache of frozen-encoder features: with model.text.cache_frozen or model.image.cache_frozen, each item's
frozen-bottom output is written once (to model.feature_cache_dir) and read back by later runs, validations,
evaluations and finetuning cells. An entry is one frozen bottom (its exact weights, split and config) on one
domain's items shards and preprocessing; anything else makes a new entry. 'list' shows the entries; 'prune' removes
those not used for --older-than DAYS days, or --all of them, and the temporary files of killed writers (a process
that needs a removed entry recomputes it)."""


class _Parser(argparse.ArgumentParser):
    """Bad arguments give one ``error:`` line and exit status 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="python -m pretrain.cache", description=DESCRIPTION)
    commands = p.add_subparsers(dest="command", required=True, metavar="{list,prune}")
    dir_help = ("the store's folder (default: model.feature_cache_dir's default, $MOMREC_CACHE/features or "
                "~/.cache/momrec/features)")  # fmt: skip
    show = commands.add_parser("list", help="show the entries, most recently used first")
    show.add_argument("--dir", help=dir_help)
    cut = commands.add_parser("prune", help="remove old entries (--older-than DAYS) or all of them (--all)")
    cut.add_argument("--dir", help=dir_help)
    which = cut.add_mutually_exclusive_group(required=True)
    which.add_argument("--older-than", type=_days, metavar="DAYS", help="entries last used more than DAYS days ago")
    which.add_argument("--all", action="store_true", help="every entry")
    return p.parse_args(argv)


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"DAYS must be a number, got {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"DAYS must be >= 0, got {text!r}")
    return value


def _root(arg: str | None) -> Path:
    root = feature_dir(arg or "")
    if root is None:
        raise ValueError("--dir none names no folder")
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    return root


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _row(info: EntryInfo) -> str:
    s, bottom, source = info.summary, info.summary.get("bottom", {}), info.summary.get("source", {})
    prep = (f"max_text_len {source['max_text_len']}" if "max_text_len" in source
            else f"image_size {source.get('image_size', '?')}")  # fmt: skip
    model = f"{bottom.get('model', '?')} {bottom.get('split', '?')}/{bottom.get('stages', '?')} stages"
    used = datetime.datetime.fromtimestamp(info.last_used).strftime("%Y-%m-%d %H:%M")
    items = f"{info.items}/{source.get('n_items', '?')}"
    return (f"{info.folder.name}  {s.get('tower', '?'):5}  {str(source.get('domain', '?')):16}  {items:>11}  "
            f"{model} {bottom.get('dtype', '?')} weights {bottom.get('weights', '?')[:8]}, {prep}  "
            f"{_size(info.bytes):>10}  {used}")  # fmt: skip


def show(root: Path) -> None:
    infos = list_entries(root)
    print(f"feature cache {root}: {len(infos)} entries, {_size(sum(i.bytes for i in infos))}")
    if infos:
        print(f"{'entry':32}  {'tower':5}  {'domain':16}  {'items':>11}  key (model split/stages dtype weights, "
              f"preprocessing)  {'size':>10}  last used")  # fmt: skip
    for info in infos:
        print(_row(info))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        root = _root(args.dir)
        if args.command == "list":
            show(root)
            return 0
        removed, freed = prune(root, None if args.all else args.older_than * DAY_S)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"removed {len(removed)} entries, freed {_size(freed)} from {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
