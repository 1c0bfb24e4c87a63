"""``python -m serve --model FOLDER --data SHARDS [SHARDS ...] --out DIR``: item embeddings, a FAISS index and the
ONNX user tower of a pretrained export or a finetuned model (see :mod:`serve.build` for the files)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from pretrain.catalog import ENCODE_CHUNK
from pretrain.cli import setup_logging

from .build import ServeOptions, write_serving
from .models import load_model


def _count(text: str, least: int) -> int:
    value = int(text)
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
    return value


def _positive(text: str) -> int:
    return _count(text, 1)


def _non_negative(text: str) -> int:
    return _count(text, 0)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m serve",
        description="Write the serving files of a model: per domain, every catalog item's embedding "
        "(item_embeddings.safetensors, items.json), an exact FAISS inner-product index of them (items.faiss) and "
        "the user tower (user_tower.onnx: history of catalog indices -> unit user vector), plus a README.md. "
        "FAISS search with the tower's vectors ranks as the model does (docs/serving.md).",
    )
    p.add_argument("--model", required=True, metavar="FOLDER", help="a pretrained export (config.json + "
                   "model.safetensors) or a finetuned model (finetuned.json + adapter_model.safetensors)")  # fmt: skip
    p.add_argument("--data", required=True, nargs="+", metavar="SHARDS", help="built domain folder(s) whose "
                   "catalogs to serve (one subfolder of --out each)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (replaced if it holds an earlier "
                   "output of this command; any other existing folder is refused)")  # fmt: skip
    p.add_argument("--pretrained", metavar="EXPORT", help="where a finetuned model's pretrained export is now, "
                   "when it moved since finetuning")  # fmt: skip
    p.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo", help="ONNX exporter: "
                   "torch.onnx.export(dynamo=True), falling back to the TorchScript one if it fails (default); or "
                   "the TorchScript one alone (faster)")  # fmt: skip
    p.add_argument("--encode-chunk", type=_positive, default=ENCODE_CHUNK, help="catalog items encoded per call")
    p.add_argument("--check-users", type=_non_negative, default=64, help="held-out test users whose ONNX user "
                   "vector is compared with the model's (0: no check)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch device that encodes the catalog (default cpu)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Path:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here")
    served = load_model(args.model, args.pretrained)
    served.model.to(device)
    opts = ServeOptions(args.exporter, args.encode_chunk, args.check_users)
    out = Path(args.out)
    write_serving(served, list(args.data), out, opts)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        out = run(args)
    except ValueError as e:  # bad input (InputError is one too): the message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving files -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
