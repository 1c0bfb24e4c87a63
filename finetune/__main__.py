"""``python -m finetune --from PRETRAINED_EXPORT|none --data SHARDS [SHARDS ...] --mode full|lora|adapter|frozen|top
[--config FILE] [section.field=value ...] [--resume] [--force-unlock]``

Also ``deepspeed --module finetune ...`` and ``torchrun -m finetune ...``, as for pretraining.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import get_args

from finetune.config import FinetuneMode, config_help
from pretrain.cli import add_config_arguments, add_run_arguments, run_overrides, setup_logging
from pretrain.configlib import to_dict

DESCRIPTION = """\
Transfer a pretrained model (python -m pretrain's run.out_dir/model) to target domains. The model is rebuilt from
the pretrained run's config on the target catalog and gets every pretrained weight except the catalog-dependent
ones (item-ID embeddings, interest buffers: skipped and reported); then it trains with the pretrain engine
(DeepSpeed, any ZeRO stage), validating on the target domains, keeping the best valid/ndcg@10 in out_dir/best and
stopping early with run.early_stop_patience.

modes (--mode, finetune.mode):
  full      every parameter trains
  lora      Hugging Face PEFT LoRA (finetune.lora_rank, lora_alpha, lora_dropout) on the text backbone's attention
            (BERT/MiniLM: query, value), the image backbone's (ViT: q_proj, v_proj) and the user encoder's q_proj,
            k_proj, v_proj, o_proj; plus pooling, projections and fusion. ResNet and ConvNeXt have no attention:
            no LoRA there by default, the image encoder trains its projection only (conv layers can be named in
            finetune.lora_image_targets). Every named target must match a layer, else it is an error.
            finetune.lora_top_layers=K: LoRA in the last K blocks of each item backbone only, so the frozen blocks
            below run once per item (model.*.cache_frozen) instead of at every step
  adapter   only pooling, projections and fusion (MISSRec's adapters); backbones and user encoder frozen
  frozen    pooling, projections, fusion and the user encoder; the item backbones frozen (UniSRec / MISSRec's
            frozen-text setting; with model.*.cache_frozen each item's backbone output is computed once)
  top       the finetune.top_layers last blocks of each item backbone (TransRec) and everything outside them
With finetune.id_embeddings=true every mode also trains fresh item-ID embeddings of the target catalog. The mode
sets model.text.trainable and model.image.trainable (so they are not set by hand). Trainable parameters per part
are printed at the start.

config: the pretrained run's model, data.stream and loss sections, then --config files, then --from/--data/--mode,
then section.field=value overrides (finetune defaults: run.out_dir=runs/finetune, run.keep_best=true). optim is
not inherited: the learning rates are this run's (default lr 1e-3 everywhere); the log shows both runs'. With --from
none the architecture comes from the files: give the preset the pretraining used (a pretraining run's config.json
works too, but brings its run and optim sections along).

output (run.out_dir): config.json, metrics.jsonl, tb/, checkpoints/ as in pretraining; model/ (the end) and best/
(best validation): finetuned.json (config, catalog, a pointer to the pretrained export: its path and the SHA-256 of
its weights) + adapter_model.safetensors (only the trained tensors, LoRA under PEFT's names); reload with
finetune.load_finetuned(folder) (LoRA merged into the weights). summary.json: trainable parameters per part, the
transferred and skipped tensors, steps, time per epoch, peak memory, the best validation, and the
full-ranking test metrics of the best model (pretrain.evaluate: test/full/ndcg@10, ...)."""

EXAMPLES = """\
examples:
  python -m finetune --from runs/tiny/model --data runs/demo/shards/fashion --mode lora --config launch/configs/tiny.toml run.out_dir=runs/ft-lora
  python -m finetune --from none --config launch/configs/tiny.toml --data runs/demo/shards/fashion --mode full run.out_dir=runs/ft-scratch
Every config key, with its type, default and meaning: python -m finetune --help-config"""  # noqa: E501

_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


def add_source_arguments(p: argparse.ArgumentParser, required: bool = False) -> None:
    """``--from`` (the pretrained export, or none) and ``--data`` (the target folders); see :func:`split_data`."""
    p.add_argument("--from", dest="source", metavar="PRETRAINED_EXPORT|none", required=required, help="a "
                   "pretraining run's model/ folder, or 'none': no pretraining (finetune.from_path)")  # fmt: skip
    p.add_argument("--data", nargs="+", metavar="SHARDS", required=required, help="built target domain folders "
                   "(data.domains); they are also the validation domains")  # fmt: skip


def split_data(args: argparse.Namespace) -> argparse.Namespace:
    """``--data a b x.y=1``: the greedy --data also took the overrides that followed it; give them back."""
    if args.data:
        args.overrides = [*(d for d in args.data if _OVERRIDE.match(d)), *args.overrides]
        args.data = [d for d in args.data if not _OVERRIDE.match(d)]
    return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m finetune",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_source_arguments(p)
    p.add_argument("--mode", choices=list(get_args(FinetuneMode)), help="what trains (finetune.mode)")
    add_config_arguments(p)
    add_run_arguments(p)
    return split_data(p.parse_intermixed_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(config_help(), end="")
        return 0
    setup_logging()  # before the config loads: its notes (a warm-up cut to the run) are log lines too
    try:
        from .run import resolve_config

        cfg = resolve_config(args.source, args.data, args.mode, args.config, run_overrides(args))
        if args.print_config:
            print(json.dumps(to_dict(cfg), indent=2))
            return 0
        from pretrain.distributed import shutdown

        from .run import finetune

        try:
            finetune(cfg)
        finally:
            shutdown()
    except ValueError as e:  # bad config or input: the message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
