"""``python -m benchmarks.finetune_modes --from EXPORT --data SHARDS [--modes full top adapter lora lora_top1 ...]``:
the finetune modes side by side on one batch of the target, in one process (so the ratios compare like with like).

For each mode the model is prepared as ``python -m finetune`` prepares it (pretrained weights, target catalog, the
mode's trainable part), then trained for ``--steps`` steps with AdamW on the same batch: the first step (which
fills the frozen-bottom cache where there is one) and the median of the others (the steady state, every item of
the batch cached) are reported with the trainable parameters and the ratio to the first mode. ``lora_topK`` is
``lora`` with ``finetune.lora_top_layers=K``. No DeepSpeed and no data loader workers: the step alone.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from finetune.__main__ import add_source_arguments, split_data
from pretrain.cli import add_config_arguments

MODES = ("full", "top", "adapter", "lora")
_LORA_TOP = re.compile(r"lora_top(\d+)")


def mode_layer(spec: str) -> tuple[str, list[str]]:
    """(finetune mode, extra overrides) of a ``--modes`` entry."""
    if spec in MODES:
        return spec, []
    found = _LORA_TOP.fullmatch(spec)
    if found is None:
        raise ValueError(f"--modes: unknown mode {spec!r} (one of {', '.join(MODES)}, or lora_topK)")
    return "lora", [f"finetune.lora_top_layers={int(found.group(1))}"]


def time_mode(source: str, data: list[str], spec: str, files: list[str], overrides: list[str], steps: int) -> dict:
    """Prepare the model of mode ``spec`` and time ``steps`` training steps on the target's first batch."""
    from finetune.run import NONE, resolve_config
    from finetune.transfer import Source, prepare_model
    from pretrain.model import Catalog
    from pretrain.optim import adamw, param_groups
    from shards.stream import SequenceStream

    mode, extra = mode_layer(spec)
    cfg = resolve_config(source, data, mode, files, [*overrides, "data.stream.num_workers=0", *extra])
    torch.manual_seed(0)
    model, prepared = prepare_model(cfg, Catalog.from_folders(cfg.data.domains), None if source == NONE else
                                    Source.open(source))  # fmt: skip
    batch = next(iter(SequenceStream(cfg.data.domains, cfg.data.stream)))
    optimizer = adamw(param_groups(model, cfg.optim), cfg.optim)  # what training steps with
    model.train()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return {
        "mode": spec,
        "trainable": prepared.params["all"]["trainable"],
        "total": prepared.params["all"]["total"],
        "first_step_s": seconds[0],
        "step_s": statistics.median(seconds[1:]),
        "batch_size": cfg.data.stream.batch_size,
    }


def report(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["step_s"]
    lines = [
        f"{'mode':<12}{'trainable':>12}{'of':>12}{'first step s':>14}{'step s':>9}{'speed vs ' + rows[0]['mode']:>16}"
    ]
    for r in rows:
        lines.append(f"{r['mode']:<12}{r['trainable']:>12,}{r['total']:>12,}{r['first_step_s']:>14.2f}"
                     f"{r['step_s']:>9.2f}{base / r['step_s']:>15.2f}x")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.finetune_modes", description=__doc__.split("\n\n")[0])
    add_source_arguments(p, required=True)
    p.add_argument("--modes", nargs="+", default=["full", "top", "adapter", "lora", "lora_top1"],
                   help="modes to compare; lora_topK = lora with finetune.lora_top_layers=K")  # fmt: skip
    p.add_argument("--steps", type=int, default=6, help="training steps per mode (>= 2: the first is reported apart)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_config_arguments(p)
    return split_data(p.parse_intermixed_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        from finetune.config import config_help

        print(config_help(), end="")
        return 0
    try:
        if args.steps < 2:
            raise ValueError("--steps must be >= 2")
        for spec in args.modes:
            mode_layer(spec)  # every entry checked before anything runs
        if args.threads:
            torch.set_num_threads(args.threads)
        rows = []
        for spec in args.modes:
            rows.append(time_mode(args.source, args.data, spec, args.config, args.overrides, args.steps))
            print(f"[bench] {spec}: {rows[-1]['step_s']:.2f} s/step", file=sys.stderr, flush=True)
    except ValueError as e:  # bad input or config: the message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"one batch of {rows[0]['batch_size']} sequences, {args.steps} steps per mode, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
