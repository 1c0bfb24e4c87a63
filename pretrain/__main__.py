"""``python -m pretrain --config FILE [--config FILE ...] [section.field=value ...] [--resume]``

Also ``deepspeed --module pretrain ...`` (the launcher's appended ``--local_rank=N`` is accepted and ignored: the
rank comes from the environment) and ``torchrun --nproc_per_node N -m pretrain ...``; see launch/pretrain.sh.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from .config import config_help, deepspeed_config, load_config, to_dict


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pretrain",
        description="Pretrain the multimodal sequential recommender (DeepSpeed ZeRO; CPU or GPU; one or many ranks).",
        epilog="Every config key, with its type, default and meaning: python -m pretrain --help-config",
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="TOML (or saved JSON) config; repeat to layer files, later ones win "
        "(e.g. launch/configs/tiny.toml launch/ds/zero3.toml)",
    )
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="overrides, applied last")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run.out_dir "
                   "(same as run.resume=true; starts afresh when there is none yet)")  # fmt: skip
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--print-deepspeed", action="store_true", help="print the derived DeepSpeed config (for "
                   "WORLD_SIZE ranks, default 1) and exit")  # fmt: skip
    p.add_argument("--help-config", action="store_true", help="describe every config key and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # appended by `deepspeed`
    return p.parse_intermixed_args(argv)


def _setup_logging() -> None:
    rank0 = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(
        level=logging.INFO if rank0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(config_help(), end="")
        return 0
    try:
        cfg = load_config(args.config, [*args.overrides, *(["run.resume=true"] if args.resume else [])])
        if args.print_config:
            print(json.dumps(to_dict(cfg), indent=2))
            return 0
        if args.print_deepspeed:
            print(json.dumps(deepspeed_config(cfg, int(os.environ.get("WORLD_SIZE", "1"))), indent=2))
            return 0
        if not cfg.data.domains:
            raise ValueError("data.domains is empty: name the built domain folders to train on (in a config file, "
                             "or data.domains=path/a,path/b)")  # fmt: skip
        _setup_logging()
        from .engine import CollectiveError, shutdown, train  # imports DeepSpeed: only when training

        try:
            train(cfg)
        except CollectiveError as e:  # another rank died or hung: say so, without a traceback
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            shutdown()
    except ValueError as e:  # bad config or input (InputError is one too): the message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
