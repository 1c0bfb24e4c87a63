"""``python -m shards``: build, synthesize, inspect and verify WebDataset shards of recommendation data."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from .errors import InputError
from .outdir import Interrupted, interruptible
from .schema import SampleError

_EPILOG = """examples:
  python -m shards synth --out data/synth
  python -m shards build --format generic --input data/synth/books --out shards/books
  python -m shards inspect shards/books
  python -m shards verify shards/books
  python -m shards subset shards/books --fraction 0.25 --seed 0 --out shards/books-25
  python -m shards stream shards/books shards/movies --batch-size 8 --batches 2
"""


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field (they are the single source of option help)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        node.target.id: str(nxt.value.value)
        for node, nxt in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
    }  # fmt: skip


def add_options(parser: argparse.ArgumentParser, cls: type, choices: dict[str, Sequence[str]] | None = None) -> None:
    """One --option per field of dataclass ``cls``, typed from its annotation, documented by its docstring."""
    docs, choices = _field_docs(cls), choices or {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kw: dict = {"default": default, "help": docs.get(f.name, "")}
        if f.type == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif f.type.startswith("tuple[float"):
            kw.update(type=float, nargs=len(default), metavar="X")
        else:
            kind = f.type.removesuffix(" | None")  # None: the default is chosen later (the help says how)
            kw["type"] = int if kind == "int" else float if kind == "float" else str
        if f.name in choices:
            kw["choices"] = list(choices[f.name])
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)


def options_from(args: argparse.Namespace, cls: type) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _add_build(sub: argparse._SubParsersAction) -> None:
    from .build import BuildOptions
    from .formats import AUTO, FORMATS
    from .images import IMAGE_FITS

    p = sub.add_parser(
        "build",
        help="build one domain's shards from a dataset folder",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input", required=True, help="dataset folder in the layout of --format")
    p.add_argument("--out", required=True, help="output folder (created atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_options(p, BuildOptions, {"format": [AUTO, *sorted(FORMATS)], "image_fit": IMAGE_FITS})


def _add_stream(sub: argparse._SubParsersAction) -> None:
    from .stream_config import SPLITS, StreamConfig

    p = sub.add_parser(
        "stream",
        help="stream training batches from built domains and describe them",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("folders", nargs="+", help="folders written by 'build' (pooled into one stream)")
    p.add_argument("--batches", type=int, default=3, help="batches to describe")
    p.add_argument("--epoch", type=int, default=0, help="epoch to stream")
    add_options(p, StreamConfig, {"split": SPLITS})


def _add_synth(sub: argparse._SubParsersAction) -> None:
    from .synth import DEFAULT_DOMAINS

    p = sub.add_parser(
        "synth",
        help="write the small deterministic multi-domain demo dataset (generic format)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="folder that receives one sub-folder per domain")
    p.add_argument("--domains", default=",".join(DEFAULT_DOMAINS), help="comma-separated domain names")
    p.add_argument("--users", type=int, default=120, help="users per domain")
    p.add_argument("--items", type=int, default=150, help="items per domain")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")


def _add_subset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "subset",
        help="write a nested user subset of a built domain (same catalog; the scaling study's data sizes)",
        description="Keep round(fraction x users) users, the first in the order of sha256(seed, domain, user id): "
        "a smaller fraction's users are always inside a larger one's. The catalog (items shards, hard-linked) "
        "stays whole; the manifest's user counts and training popularity are recomputed over the kept users.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("folder", help="a folder written by 'build'")
    p.add_argument("--fraction", type=float, required=True, help="share of the users to keep, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="seed of the user order (same seed: nested subsets)")
    p.add_argument("--out", required=True, help="output folder (created atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _run(args: argparse.Namespace) -> int:
    if args.command == "build":
        from .build import BuildOptions, build
        from .inspect import summary

        build(
            args.input,
            args.out,
            options_from(args, BuildOptions),
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        print(summary(args.out))
    elif args.command == "synth":
        from .synth import synthesize

        domains = [d for d in args.domains.split(",") if d]
        folders = synthesize(
            args.out,
            domains=domains,
            users_per_domain=args.users,
            items_per_domain=args.items,
            seed=args.seed,
            progress=True,
        )
        print("\n".join(f"wrote {f}" for f in folders))
    elif args.command == "stream":
        from .inspect import describe_batches
        from .stream import SequenceStream
        from .stream_config import StreamConfig

        stream = SequenceStream(args.folders, options_from(args, StreamConfig))
        stream.set_epoch(args.epoch)
        print(describe_batches(stream, args.batches))
    elif args.command == "subset":
        from .inspect import summary
        from .subset import subset

        subset(args.folder, args.out, args.fraction, args.seed, overwrite=args.overwrite)
        print(summary(args.out))
    elif args.command == "inspect":
        from .inspect import summary

        print(summary(args.folder))
    elif args.command == "verify":
        from .inspect import verify

        problems = verify(args.folder)
        for p in problems:
            print(f"FAIL {p}")
        print(f"{args.folder}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m shards",
        description=__doc__,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    _add_build(sub)
    _add_synth(sub)
    _add_stream(sub)
    _add_subset(sub)
    for name, text in (
        ("inspect", "print a built domain's summary and one decoded sample"),
        ("verify", "check every shard against the manifest (sizes, checksums, samples)"),
    ):
        sub.add_parser(name, help=text).add_argument("folder", help="a folder written by 'build'")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with interruptible():  # SIGTERM unwinds like Ctrl-C: a build or subset removes its temporary folder
            return _run(args)
    except (InputError, SampleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"error: {str(e) or 'interrupted'}", file=sys.stderr)
        return 143 if isinstance(e, Interrupted) else 130
    except BrokenPipeError:  # the reader went away (`inspect X | head`): stop quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 141


if __name__ == "__main__":
    sys.exit(main())
