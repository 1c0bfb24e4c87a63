"""``python -m finetune.scaling --config STUDY.toml [scaling.field=value ...] [--dry-run | --report]``"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pretrain.cli import add_config_arguments, setup_logging

DESCRIPTION = """\
The scaling study (TransRec's question: does more source data give a larger gain on a new domain?). For each
source fraction (nested user subsets of every source domain; 0 = no pretraining) the model is pretrained once
(python -m pretrain), then finetuned (python -m finetune, scaling.mode) on each target fraction (nested user
subsets of the target, drawn per seed) and tested by full ranking on the whole target test split. The ID
baseline (SASRec) is trained on each target fraction too. Each run is its own process (scaling.launcher: python
-m, the deepspeed launcher or torchrun; launch/scaling.sh).

Resumable: results.csv gets a row as each cell finishes; a re-run skips finished cells, retries failed ones (from
their last checkpoint when they have one; not a run that exits 2, a config or input error) and refuses changed
settings (the grid may grow). One study at a time per folder: it holds scaling.out_dir/.lock while it runs (the lock
of a dead study on this host is taken over; scaling.force_unlock=true breaks one left by a study on another host).

Writes into scaling.out_dir: results.csv, scaling.png (log x axis, mean and min-max over seeds), scaling.md,
tb/ (tensorboard --logdir OUT/tb: hparams of every cell; custom scalars of NDCG@10 and HR@10 against source
size, one line per target fraction), and every subset, run and log."""

EXAMPLES = """\
examples:
  python -m finetune.scaling --config launch/studies/demo.toml
  python -m finetune.scaling --config launch/studies/ml100k_top.toml scaling.seeds=[0,1] --dry-run
  bash launch/scaling.sh --config launch/studies/ml100k_top.toml     # every run under the deepspeed launcher
Every key of the [scaling] table: python -m finetune.scaling --help-config"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m finetune.scaling", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_config_arguments(
        p, files="TOML file with a [scaling] table", keys="scaling.field", described="every key of [scaling]"
    )
    p.add_argument("--dry-run", action="store_true", help="list the cells and which are finished, run nothing")
    p.add_argument("--report", action="store_true", help="only redraw the figure, table and TensorBoard runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from pretrain.confighelp import config_help

    from .config import StudyConfig, load_study

    if args.help_config:
        print(config_help(StudyConfig), end="")
        return 0
    setup_logging()
    try:
        from . import report, results
        from .runner import Study

        study = Study(load_study(args.config, args.overrides), progress=not args.no_progress)
        if args.dry_run:
            pending = set(study.pending())
            for cell in study.cells:
                print(f"{'todo' if cell in pending else 'done'}  {cell.name}")
            return 0
        with study.locked():
            failed = 0 if args.report else study.run()
            rows = results.read(study.layout.results)
            if rows:
                pooled = study.pooled_gains()
                results.write_pooled(study.layout.pooled, pooled)
                for path in report.write_reports(rows, study.layout.root, pooled):
                    print(f"wrote {path}")
                print(report.markdown(rows, pooled))
    except ValueError as e:  # bad config or input (InputError is one): the message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
