"""``python -m pretrain --config FILE [--config FILE ...] [section.field=value ...] [--resume] [--force-unlock]``

Also ``deepspeed --module pretrain ...`` (the launcher's appended ``--local_rank=N`` is accepted and ignored: the
rank comes from the environment) and ``torchrun --nproc_per_node N -m pretrain ...``; see launch/pretrain.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .cli import add_config_arguments, add_run_arguments, run_overrides, setup_logging
from .config import config_help, load_config, to_dict
from .ds_config import deepspeed_config


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pretrain",
        description="Pretrain the multimodal sequential recommender (DeepSpeed ZeRO; CPU or GPU; one or many ranks).",
        epilog="Every config key, with its type, default and meaning: python -m pretrain --help-config",
    )
    add_config_arguments(p, example="e.g. launch/configs/tiny.toml launch/ds/zero3.toml")
    add_run_arguments(p)
    p.add_argument("--print-deepspeed", action="store_true", help="print the derived DeepSpeed config (for "
                   "WORLD_SIZE ranks, default 1) and exit")  # fmt: skip
    return p.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(config_help(), end="")
        return 0
    setup_logging()  # before the config loads: its notes (a warm-up cut to the run) are log lines too
    try:
        cfg = load_config(args.config, run_overrides(args))
        if args.print_config:
            print(json.dumps(to_dict(cfg), indent=2))
            return 0
        if args.print_deepspeed:
            print(json.dumps(deepspeed_config(cfg, int(os.environ.get("WORLD_SIZE", "1"))), indent=2))
            return 0
        cfg.check_ready()
        from .families import check_on_disk  # imports torch: only past --help and --print-*

        check_on_disk(cfg.model.backbone_names())  # one line now, not a traceback after the start-up
        from .distributed import CollectiveError, shutdown
        from .engine import train  # imports DeepSpeed: only when training

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
