"""``python -m shards bench``: shard build and streaming speed, side by side with plain PIL decoding.

Everything is measured in one run on one machine, so the ratios compare like with like:

- build: catalog items per second through ``build`` (reading, templating, JPEG re-encoding, tar writing);
- stream: sequences and images per second through ``SequenceStream`` (tar reading, shuffle, JSON decoding,
  tokenization, JPEG decoding, resize + crop, collation, worker IPC), one epoch, worker start-up included;
- PIL: the catalog's JPEG bytes, as many as the stream decoded, through ``Image.open(...).convert("RGB")`` alone,
  and through the stream's decode + resize + crop to uint8, in this process.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from . import schema
from .build import BuildOptions, build
from .inspect import read_shard
from .stream import SequenceStream, StreamConfig
from .synth import synthesize
from .transforms import decode_image, images_to_tensor


@dataclass(frozen=True)
class BenchOptions:
    users: int = 600
    """Users of the synthetic domain benchmarked (ignored with --input)."""
    items: int = 1500
    """Items of the synthetic domain (ignored with --input)."""
    source_image_size: int = 320
    """Side of the synthetic source images (re-encoded to --image-size by the build)."""
    image_size: int = 224
    """Longest side of shard images, and the side fed to the model."""
    batch_size: int = 32
    """Sequences per batch."""
    num_workers: int = 2
    """DataLoader workers of the stream."""
    build_workers: int = 1
    """Image re-encoding processes of the build."""


def _timed(fn, *args, **kw) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - start


def _stream_epoch(folder: Path, opts: BenchOptions) -> tuple[int, int, float]:
    cfg = StreamConfig(batch_size=opts.batch_size, num_workers=opts.num_workers, image_size=opts.image_size)
    stream = SequenceStream([folder], cfg, rank=0, world_size=1)
    start, sequences, images = time.perf_counter(), 0, 0
    for batch in stream:
        sequences += len(batch)
        images += batch.pixel_values.shape[0]
    return sequences, images, time.perf_counter() - start


def _catalog_jpegs(folder: Path) -> list[bytes]:
    m = schema.load_manifest(folder)
    return [it.image for s in m.item_shards for raw in read_shard(folder / s.name)
            if (it := schema.decode_item(raw)).image is not None]  # fmt: skip


def _pil_rate(jpegs: list[bytes], n: int, transform: bool, size: int) -> float:
    """Images per second decoding ``n`` of the catalog's JPEGs (cycling), optionally with the stream's transform.

    One torch thread, as in a DataLoader worker (torch's intra-op threads slow small per-image copies down).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    for i in range(n):
        data = jpegs[i % len(jpegs)]
        if transform:
            images_to_tensor([decode_image(data, size)], size, normalize=False)  # what a stream worker does
        else:
            Image.open(io.BytesIO(data)).convert("RGB")
    rate = n / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return rate


def run(opts: BenchOptions, input_dir: Path | None = None, fmt: str = "generic") -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if input_dir is None:
            (input_dir,) = synthesize(tmp_path / "src", domains=["bench"], users_per_domain=opts.users,
                                      items_per_domain=opts.items, image_size=opts.source_image_size)  # fmt: skip
        out = tmp_path / "shards"
        build_opts = BuildOptions(format=fmt, image_size=opts.image_size, samples_per_shard=64,
                                  workers=opts.build_workers)  # fmt: skip
        manifest, build_s = _timed(build, input_dir, out, build_opts, progress=False)
        sequences, images, stream_s = _stream_epoch(out, opts)
        jpegs = _catalog_jpegs(out)
        result = {
            "catalog_items": manifest["counts"]["items"],
            "users": manifest["counts"]["users"],
            "build_items_per_s": manifest["counts"]["items"] / build_s,
            "build_interactions_per_s": manifest["counts"]["interactions"] / build_s,
            "stream_sequences_per_s": sequences / stream_s,
            "stream_images_per_s": images / stream_s,
            "pil_decode_images_per_s": _pil_rate(jpegs, max(images, 1), False, opts.image_size),
            "pil_decode_transform_images_per_s": _pil_rate(jpegs, max(images, 1), True, opts.image_size),
            "shard_bytes": sum(s["bytes"] for k in ("items", "seqs") for s in manifest["shards"][k]),
        }
    return result


def report(r: dict[str, float], opts: BenchOptions) -> str:
    pil = r["pil_decode_images_per_s"]
    rows = [
        ("build", f"{r['build_items_per_s']:.0f} items/s ({r['build_interactions_per_s']:.0f} interactions/s)", ""),
        ("stream", f"{r['stream_sequences_per_s']:.0f} sequences/s", ""),
        ("stream images (decode+transform+collate)", f"{r['stream_images_per_s']:.0f} images/s",
         f"{r['stream_images_per_s'] / pil:.2f}x PIL decode"),
        ("PIL decode only, 1 process", f"{pil:.0f} images/s", "1.00x"),
        ("PIL decode + transform, 1 process", f"{r['pil_decode_transform_images_per_s']:.0f} images/s",
         f"{r['pil_decode_transform_images_per_s'] / pil:.2f}x PIL decode"),
    ]  # fmt: skip
    head = (
        f"{r['catalog_items']:.0f} items, {r['users']:.0f} users, image side {opts.image_size},"
        f" batch {opts.batch_size},"
        f" {opts.num_workers} stream workers, shards {r['shard_bytes'] / 2**20:.1f} MiB"
    )
    width = max(len(n) for n, _, _ in rows)
    return "\n".join([head] + [f"  {n:<{width}}  {v:<40} {ratio}" for n, v, ratio in rows])


def main(opts: BenchOptions, input_dir: Path | None, fmt: str, as_json: bool) -> None:
    result = run(opts, input_dir, fmt)
    print(json.dumps(result, indent=1) if as_json else report(result, opts))
