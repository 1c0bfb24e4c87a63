"""``python -m benchmarks.stream``: shard build and streaming speed, side by side with plain PIL decoding.

Everything is measured in one run on one machine, so the ratios compare like with like:

- build: catalog items per second through ``build`` (reading, templating, JPEG re-encoding, tar writing);
- stream: sequences and images per second through ``SequenceStream`` (tar reading, shuffle, JSON decoding,
  tokenization, JPEG decoding, resize + crop, collation, worker IPC), one epoch, worker start-up included (the
  tokenizer is loaded before, as a training run loads it once), with each process's pixel memo starting empty
  (:mod:`shards.pixel_memo`: an item image met again in the epoch is not decoded again); the same epoch with the
  memo off (``image_memo_mb = 0``: every image decoded every time it is met); and the next epoch of a stream whose
  persistent workers served the first (``persistent_workers``: not started again, their memos kept), as every epoch
  after the first of a training run;
- PIL: the catalog's JPEG bytes, as many as the stream decoded, through ``Image.open(...).convert("RGB")`` alone,
  and through the stream's decode + resize + crop into uint8 batches (as many images a batch as the stream's), in
  this process with one thread.

The five are measured in ``--rounds`` interleaved rounds (stream epoch, stream epoch without the memo, next epoch,
PIL decode, PIL + transform; again) and the medians are reported, with the spread of the per-round ratios: on the shared
machines measured here a process's speed drifts by up to 1.5x within a minute, so one measurement of each in a fixed
order biases their ratio.

The stream runs in several processes (its DataLoader workers and this one), PIL in one, so images per second of
wall-clock time do not compare them per core. The ratios are per core: images per CPU-second, counting the CPU time
of every process involved (this one and its reaped workers, from ``os.times()``; running persistent workers from
``/proc``). CPU time is also what stays
meaningful when other jobs share the cores; the wall-clock rates are printed beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shards import schema
from shards.__main__ import add_options, options_from
from shards.build import BuildOptions, build
from shards.formats import FORMATS
from shards.images import IMAGE_FITS
from shards.inspect import read_shard
from shards.pixel_memo import pixel_memo
from shards.stream import SequenceStream
from shards.stream_config import StreamConfig
from shards.synth import synthesize
from shards.tokens import load_tokenizer
from shards.transforms import decode_image, images_to_tensor


@dataclass(frozen=True)
class BenchOptions:
    users: int = 600
    """Users of the synthetic domain benchmarked (ignored with --input)."""
    items: int = 1500
    """Items of the synthetic domain (ignored with --input)."""
    source_image_size: int = 320
    """Side of the synthetic source images (re-encoded to --image-size by the build)."""
    image_size: int = 224
    """Side of shard images (build), and the side fed to the model (stream)."""
    image_fit: str = "crop"
    """How the build sizes images (shards build --image-fit: crop or contain)."""
    batch_size: int = 32
    """Sequences per batch."""
    num_workers: int = 2
    """DataLoader workers of the stream."""
    build_workers: int = 1
    """Image re-encoding processes of the build."""
    rounds: int = 3
    """Interleaved rounds of the two stream epochs and the two PIL measurements (medians reported)."""
    image_memo_mb: int = 256
    """Pixel memo of each stream process (data.stream.image_memo_mb) in the first stream epoch of a round."""


class _Clock:
    """Wall-clock and CPU seconds since it was made; CPU counts this process and its reaped child processes."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), self._cpu_now()

    @staticmethod
    def _cpu_now() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, self._cpu_now() - self.cpu


def _timed(fn, *args, **kw) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - start


def _new_stream(folder: Path, opts: BenchOptions, memo_mb: int, persistent: bool) -> SequenceStream:
    """A stream of ``folder`` as ``opts`` say, with a pixel memo of ``memo_mb`` that starts empty (as in a new
    process: what workers fork from, or use without workers)."""
    cfg = StreamConfig(batch_size=opts.batch_size, num_workers=opts.num_workers, image_size=opts.image_size,
                       image_memo_mb=memo_mb, persistent_workers=persistent)  # fmt: skip
    load_tokenizer(cfg.text_model)  # once per run, not per epoch
    pixel_memo(cfg.image_size, cfg.image_memo_mb << 20).clear()
    return SequenceStream([folder], cfg, rank=0, world_size=1)


def _stream_epoch(folder: Path, opts: BenchOptions, memo_mb: int) -> tuple[int, int, int, float, float]:
    """Sequences, images, batches, wall-clock and CPU seconds of one epoch, with a pixel memo of ``memo_mb`` that
    starts empty; its workers are its own and exit at its end, so ``os.times`` counts them."""
    stream = _new_stream(folder, opts, memo_mb, persistent=False)
    clock, sequences, images, batches = _Clock(), 0, 0, 0
    for batch in stream:
        sequences += len(batch)
        images += batch.pixel_values.shape[0]
        batches += 1
    return sequences, images, batches, *clock.read()


def _stream_later_epoch(folder: Path, opts: BenchOptions) -> tuple[int, float, float]:
    """Images, wall-clock and CPU seconds of epoch 1 of a stream with persistent workers, after its epoch 0: the
    workers are not started again and keep what their memos hold (CPU counts this process and the workers, read
    from /proc while they run)."""
    stream = _new_stream(folder, opts, opts.image_memo_mb, persistent=True)
    try:
        for _ in stream:
            pass
        stream.set_epoch(1)
        wall, cpu, images = time.perf_counter(), _own_cpu() + _cpu_of(stream.worker_pids()), 0
        for batch in stream:
            images += batch.pixel_values.shape[0]
        wall, cpu = time.perf_counter() - wall, _own_cpu() + _cpu_of(stream.worker_pids()) - cpu
    finally:
        stream.close()
    return images, wall, max(cpu, 1 / os.sysconf("SC_CLK_TCK"))  # at least the clock's tick: never 0


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _cpu_of(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) the running processes ``pids`` have used, from /proc (Linux)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of the line
    return total / os.sysconf("SC_CLK_TCK")


def _catalog_jpegs(folder: Path) -> list[bytes]:
    m = schema.load_manifest(folder)
    return [it.image for s in m.item_shards for raw in read_shard(folder / s.name)
            if (it := schema.decode_item(raw)).image is not None]  # fmt: skip


MIN_CPU_S = 0.5
"""A PIL measurement repeats its ``n`` images until it has used this much CPU time (the clock ticks in 10 ms)."""


def _pil_rate(jpegs: list[bytes], n: int, size: int, per_batch: int = 0) -> tuple[float, float]:
    """Images per wall-clock and per CPU second decoding ``n`` of the catalog's JPEGs (cycling; the ``n`` again until
    :data:`MIN_CPU_S` is spent); with ``per_batch``, also transformed to uint8 batches of that many images, as a
    stream worker collates them.

    One torch thread, as in a DataLoader worker (torch's intra-op threads slow small per-image copies down).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    clock, done = _Clock(), 0
    while done == 0 or clock.read()[1] < MIN_CPU_S:
        _pil_pass(jpegs, n, size, per_batch)
        done += n
    wall, cpu = clock.read()
    torch.set_num_threads(threads)
    return done / wall, done / cpu


def _pil_pass(jpegs: list[bytes], n: int, size: int, per_batch: int) -> None:
    if per_batch:
        for start in range(0, n, per_batch):
            decoded = [decode_image(jpegs[i % len(jpegs)], size) for i in range(start, min(n, start + per_batch))]
            images_to_tensor(decoded, size, normalize=False)
    else:
        for i in range(n):
            Image.open(io.BytesIO(jpegs[i % len(jpegs)])).convert("RGB")


def _fresh_memory_us(images: int, size: int) -> tuple[float, float]:
    """CPU microseconds per image of copying one image's pixels into a batch-sized tensor in fresh shared memory (as a
    stream worker allocates each batch), and again into the same, now mapped, memory: the difference is what the
    machine's page faults cost per image (the stream pays it at every batch; PIL's decode reuses its own buffers)."""
    pixels_CSS = np.full((3, size, size), 7, dtype=np.uint8)
    shape = (images, 3, size, size)
    batch = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(int(np.prod(shape)))).view(shape)
    out = batch.numpy()
    costs = []
    for _ in range(2):
        start = time.process_time()  # this process alone, at nanosecond resolution (os.times ticks in 10 ms)
        for n in range(images):
            out[n] = pixels_CSS
        costs.append((time.process_time() - start) / images * 1e6)
    return costs[0], costs[1]


def run(opts: BenchOptions, input_dir: Path | None = None, fmt: str = "generic") -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if input_dir is None:
            (input_dir,) = synthesize(tmp_path / "src", domains=["bench"], users_per_domain=opts.users,
                                      items_per_domain=opts.items, image_size=opts.source_image_size)  # fmt: skip
        out = tmp_path / "shards"
        build_opts = BuildOptions(format=fmt, image_size=opts.image_size, image_fit=opts.image_fit,
                                  samples_per_shard=64, workers=opts.build_workers)  # fmt: skip
        manifest, build_s = _timed(build, input_dir, out, build_opts, progress=False)
        jpegs = _catalog_jpegs(out)
        rounds = [_round(out, jpegs, opts) for _ in range(max(1, opts.rounds))]
        r = {k: statistics.median(x[k] for x in rounds) for k in rounds[0]}
        ratios = [x["stream_images_per_cpu_s"] / x["pil_decode_images_per_cpu_s"] for x in rounds]
        memo_gains = [x["stream_images_per_cpu_s"] / x["stream_no_memo_images_per_cpu_s"] for x in rounds]
        later = [x["stream_later_epoch_images_per_cpu_s"] / x["pil_decode_images_per_cpu_s"] for x in rounds]
        result = {
            "catalog_items": manifest["counts"]["items"],
            "users": manifest["counts"]["users"],
            "build_items_per_s": manifest["counts"]["items"] / build_s,
            "build_interactions_per_s": manifest["counts"]["interactions"] / build_s,
            **r,
            "stream_vs_pil_decode_per_core": r["stream_images_per_cpu_s"] / r["pil_decode_images_per_cpu_s"],
            "stream_vs_pil_decode_per_core_min": min(ratios),
            "stream_vs_pil_decode_per_core_max": max(ratios),
            "stream_no_memo_vs_pil_decode_per_core": r["stream_no_memo_images_per_cpu_s"]
            / r["pil_decode_images_per_cpu_s"],
            "stream_later_epoch_vs_pil_decode_per_core": r["stream_later_epoch_images_per_cpu_s"]
            / r["pil_decode_images_per_cpu_s"],
            "stream_later_epoch_vs_pil_decode_per_core_min": min(later),
            "stream_later_epoch_vs_pil_decode_per_core_max": max(later),
            "memo_gain_per_core": statistics.median(memo_gains),
            "memo_gain_per_core_min": min(memo_gains),
            "memo_gain_per_core_max": max(memo_gains),
            "rounds": len(rounds),
            "shard_bytes": sum(s["bytes"] for k in ("items", "seqs") for s in manifest["shards"][k]),
        }
    return result


def _round(out: Path, jpegs: list[bytes], opts: BenchOptions) -> dict[str, float]:
    """One round: a stream epoch with the memo and one without, then as many of the catalog's JPEGs through PIL alone
    and through the transform."""
    sequences, images, batches, stream_s, stream_cpu_s = _stream_epoch(out, opts, opts.image_memo_mb)
    _, no_memo_images, _, no_memo_s, no_memo_cpu_s = _stream_epoch(out, opts, 0)
    later_images, later_s, later_cpu_s = _stream_later_epoch(out, opts) if opts.num_workers else (0, 1.0, 1.0)
    n = max(images, 1)
    pil, pil_cpu = _pil_rate(jpegs, n, opts.image_size)
    per_batch = -(-n // max(batches, 1))
    pil_transform, pil_transform_cpu = _pil_rate(jpegs, n, opts.image_size, per_batch=per_batch)
    fresh_us, mapped_us = _fresh_memory_us(per_batch, opts.image_size)
    return {
        "stream_sequences_per_s": sequences / stream_s,
        "stream_images_per_s": images / stream_s,
        "stream_images_per_cpu_s": images / stream_cpu_s,
        "stream_later_epoch_images_per_s": later_images / later_s,
        "stream_later_epoch_images_per_cpu_s": later_images / later_cpu_s,
        "stream_no_memo_images_per_s": no_memo_images / no_memo_s,
        "stream_no_memo_images_per_cpu_s": no_memo_images / no_memo_cpu_s,
        "pil_decode_images_per_s": pil,
        "pil_decode_images_per_cpu_s": pil_cpu,
        "pil_decode_transform_images_per_s": pil_transform,
        "pil_decode_transform_images_per_cpu_s": pil_transform_cpu,
        "fresh_memory_copy_us_per_image": fresh_us,
        "mapped_memory_copy_us_per_image": mapped_us,
    }


def report(r: dict[str, float], opts: BenchOptions) -> str:
    pil = r["pil_decode_images_per_cpu_s"]
    procs = f"{opts.num_workers} workers + this process" if opts.num_workers else "1 process"
    rows = [
        ("build", f"{r['build_items_per_s']:.0f} items/s ({r['build_interactions_per_s']:.0f} interactions/s)", ""),
        ("stream", f"{r['stream_sequences_per_s']:.0f} sequences/s", ""),
        (f"stream images, first epoch (all of the stream), {procs}",
         f"{r['stream_images_per_s']:.0f} images/s, {r['stream_images_per_cpu_s']:.0f}/CPU-s",
         f"{r['stream_images_per_cpu_s'] / pil:.2f}x per core"),
        ("its next epoch, persistent workers (memos kept)",
         f"{r['stream_later_epoch_images_per_s']:.0f} images/s, {r['stream_later_epoch_images_per_cpu_s']:.0f}/CPU-s",
         f"{r['stream_later_epoch_images_per_cpu_s'] / pil:.2f}x per core"),
        ("the first epoch, pixel memo off (image_memo_mb = 0)",
         f"{r['stream_no_memo_images_per_s']:.0f} images/s, {r['stream_no_memo_images_per_cpu_s']:.0f}/CPU-s",
         f"{r['stream_no_memo_images_per_cpu_s'] / pil:.2f}x per core"),
        ("PIL decode only, 1 process", f"{r['pil_decode_images_per_s']:.0f} images/s, {pil:.0f}/CPU-s", "1.00x"),
        ("PIL decode + transform + batch, 1 process",
         f"{r['pil_decode_transform_images_per_s']:.0f} images/s, {r['pil_decode_transform_images_per_cpu_s']:.0f}"
         "/CPU-s", f"{r['pil_decode_transform_images_per_cpu_s'] / pil:.2f}x per core"),
    ]  # fmt: skip
    head = (
        f"{r['catalog_items']:.0f} items, {r['users']:.0f} users, image side {opts.image_size} ({opts.image_fit}),"
        f" batch {opts.batch_size},"
        f" {opts.num_workers} stream workers, shards {r['shard_bytes'] / 2**20:.1f} MiB"
    )
    width = max(len(n) for n, _, _ in rows)
    tail = (
        f"stream, first epoch / PIL decode: {r['stream_vs_pil_decode_per_core']:.2f}x per core"
        " (images per CPU-second, all the stream's processes counted; medians of"
        f" {r['rounds']:.0f} interleaved rounds, whose ratios ran {r['stream_vs_pil_decode_per_core_min']:.2f}"
        f"-{r['stream_vs_pil_decode_per_core_max']:.2f}x)\n"
        f"later epochs / PIL decode: {r['stream_later_epoch_vs_pil_decode_per_core']:.2f}x per core (rounds"
        f" {r['stream_later_epoch_vs_pil_decode_per_core_min']:.2f}"
        f"-{r['stream_later_epoch_vs_pil_decode_per_core_max']:.2f}x)\n"
        f"pixel memo on / off: {r['memo_gain_per_core']:.2f}x per core (rounds {r['memo_gain_per_core_min']:.2f}"
        f"-{r['memo_gain_per_core_max']:.2f}x)\n"
        f"copying an image into a batch in fresh shared memory: {r['fresh_memory_copy_us_per_image']:.0f} us of CPU,"
        f" into mapped memory {r['mapped_memory_copy_us_per_image']:.0f} us; a PIL decode takes {1e6 / pil:.0f} us"
        " (the difference is this machine's page faults, which the stream pays at every batch)"
    )
    return "\n".join([head] + [f"  {n:<{width}}  {v:<34} {ratio}" for n, v, ratio in rows] + [tail])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.stream",
        description="Measure build and streaming speed next to plain PIL decoding.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input", default=None, help="benchmark this dataset folder instead of a synthetic domain")
    p.add_argument("--format", default="generic", choices=sorted(FORMATS), help="layout of --input")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    add_options(p, BenchOptions, {"image_fit": IMAGE_FITS})
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opts = options_from(args, BenchOptions)
    result = run(opts, args.input and Path(args.input), args.format)
    print(json.dumps(result, indent=1) if args.json else report(result, opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
