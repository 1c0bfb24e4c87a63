"""``python -m benchmarks.feature_cache --domains FOLDER [FOLDER ...]``: what the disk feature cache gives a process
that encodes whole catalogs (validation, evaluation, a finetuning cell), measured in one run on one machine.

Each domain's catalog is encoded twice, each time by a fresh model (an empty in-memory cache, as a new process
has), with the same weights: first over an empty disk store (the frozen bottoms run and their outputs are written),
then over the warm store (they are read). It prints items/s of both, their ratio, and whether the two encodings are
bit-identical. The store is a temporary folder unless ``--dir`` is given (which must then start empty for the
first pass to be cold). The config must cache a frozen part: model.text.cache_frozen or model.image.cache_frozen
with trainable 'top' or 'none'.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from pretrain.catalog import encode_catalog
from pretrain.config import TrainConfig, load_config
from pretrain.model import Catalog, Recommender

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "launch/configs/tiny.toml"
FROZEN_TOP = [
    f"model.{tower}.{setting}"
    for tower in ("text", "image")
    for setting in ("trainable=top", "top_layers=1", "cache_frozen=true")
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.feature_cache",
        description="Encode each domain's catalog with an empty, then a warm disk feature cache (fresh models, the "
        "same weights) and print items/s of both and their ratio.",
        epilog=f"Without --config: {DEFAULT_CONFIG.relative_to(REPO)} with both towers' top layer trained and "
        "their frozen bottoms cached (" + " ".join(FROZEN_TOP) + ").",
    )
    p.add_argument("--domains", nargs="+", required=True, metavar="FOLDER", help="built domain folders")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="TOML config, repeat to layer")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides, applied last")
    p.add_argument("--dir", help="the store's folder (default: a temporary one, removed afterwards)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    return p.parse_intermixed_args(argv)


def fresh_model(cfg: TrainConfig, catalog: Catalog) -> Recommender:
    torch.manual_seed(cfg.engine.seed)
    return Recommender(cfg.model, cfg.loss, catalog, image_size=cfg.data.stream.image_size).eval()


def encode_all(cfg: TrainConfig, catalog: Catalog) -> tuple[list[torch.Tensor], float, dict[str, dict[str, int]]]:
    """Every domain's catalog encoded by a fresh model: (item embeddings per domain, seconds, cache use)."""
    model = fresh_model(cfg, catalog)
    start = time.perf_counter()
    items = [encode_catalog(model, f, d, cfg.data.stream).items_UD for d, f in enumerate(cfg.data.domains)]
    return items, time.perf_counter() - start, model.feature_cache_stats()


def run(args: argparse.Namespace, store: Path) -> dict[str, float]:
    for folder in args.domains:
        if not (Path(folder) / "manifest.json").is_file():
            raise ValueError(f"domain folder {folder} has no manifest.json (build it with: python -m shards build)")
    paths = [str(p) for p in args.config] or [str(DEFAULT_CONFIG)]
    overrides = [] if args.config else list(FROZEN_TOP)
    overrides += [f"data.domains={json.dumps(args.domains)}", "data.stream.num_workers=0", *args.overrides]
    cfg = load_config(paths, [*overrides, f"model.feature_cache_dir={store}"])
    if not any(t.enabled and t.cache_frozen for t in (cfg.model.text, cfg.model.image)):
        raise ValueError("nothing to cache: set model.text.cache_frozen or model.image.cache_frozen (with trainable "
                         "'top' or 'none')")  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    catalog = Catalog.from_folders(cfg.data.domains)
    n = sum(catalog.n_items)
    cold, cold_s, cold_use = encode_all(cfg, catalog)
    warm, warm_s, warm_use = encode_all(cfg, catalog)
    same = all(torch.equal(a, b) for a, b in zip(cold, warm))
    print(f"{n} items in {len(catalog.domains)} domains, store {store}")
    print(f"empty store: {n / cold_s:10.1f} items/s  ({cold_s:.2f} s; {json.dumps(cold_use)})")
    print(f"warm store:  {n / warm_s:10.1f} items/s  ({warm_s:.2f} s; {json.dumps(warm_use)})")
    print(f"speed-up {cold_s / warm_s:.2f}x, embeddings bit-identical: {same}")
    return {"items": n, "cold_s": cold_s, "warm_s": warm_s, "ratio": cold_s / warm_s, "identical": float(same)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.dir:
            result = run(args, Path(args.dir))
        else:
            with tempfile.TemporaryDirectory(prefix="momrec-features-") as tmp:
                result = run(args, Path(tmp))
    except ValueError as e:  # bad input or config: the message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
