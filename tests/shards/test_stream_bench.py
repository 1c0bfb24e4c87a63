"""benchmarks.stream: rounds of the stream epochs (pixel memo on and off) and the two PIL measurements,
interleaved, reported as medians with the spread of the per-round ratios (speeds, not timed: only that the numbers
are consistent with each other)."""

from __future__ import annotations

import os
import statistics

import pytest

from benchmarks import stream


def test_the_ratio_is_the_median_rounds_and_its_spread_holds_it(monkeypatch) -> None:
    seen: list[dict[str, float]] = []
    real = stream._round

    def recorded(*args, **kw):
        seen.append(real(*args, **kw))
        return seen[-1]

    monkeypatch.setattr(stream, "_round", recorded)
    opts = stream.BenchOptions(users=30, items=40, source_image_size=48, image_size=32, batch_size=4,
                               num_workers=0, rounds=3)  # fmt: skip
    r = stream.run(opts)
    assert r["rounds"] == 3 and len(seen) == 3
    for key in ("stream_images_per_cpu_s", "pil_decode_images_per_cpu_s", "pil_decode_transform_images_per_s"):
        assert r[key] == statistics.median(x[key] for x in seen) > 0
    assert r["stream_vs_pil_decode_per_core"] == pytest.approx(
        r["stream_images_per_cpu_s"] / r["pil_decode_images_per_cpu_s"]
    )
    ratios = [x["stream_images_per_cpu_s"] / x["pil_decode_images_per_cpu_s"] for x in seen]
    assert (r["stream_vs_pil_decode_per_core_min"], r["stream_vs_pil_decode_per_core_max"]) == (
        min(ratios),
        max(ratios),
    )
    gains = [x["stream_images_per_cpu_s"] / x["stream_no_memo_images_per_cpu_s"] for x in seen]
    assert r["memo_gain_per_core"] == statistics.median(gains)
    assert (r["memo_gain_per_core_min"], r["memo_gain_per_core_max"]) == (min(gains), max(gains))
    assert r["stream_no_memo_vs_pil_decode_per_core"] == pytest.approx(
        r["stream_no_memo_images_per_cpu_s"] / r["pil_decode_images_per_cpu_s"]
    )
    assert r["fresh_memory_copy_us_per_image"] >= 0 and r["mapped_memory_copy_us_per_image"] >= 0  # 10 ms CPU ticks
    text = stream.report(r, opts)
    assert "3 interleaved rounds" in text and "pixel memo on / off" in text and "fresh shared memory" in text


def test_a_later_epoch_is_measured_on_running_persistent_workers(tmp_path) -> None:
    from shards.build import BuildOptions, build
    from shards.synth import synthesize

    (source,) = synthesize(tmp_path / "src", domains=["bench"], users_per_domain=30, items_per_domain=40, image_size=48)
    options = BuildOptions(format="generic", image_size=32, samples_per_shard=8)
    build(source, tmp_path / "shards", options, progress=False)
    opts = stream.BenchOptions(image_size=32, batch_size=4, num_workers=2)
    images, wall, cpu = stream._stream_later_epoch(tmp_path / "shards", opts)
    assert images > 0 and wall > 0 and cpu > 0
    own = stream._own_cpu()
    assert abs(stream._cpu_of([os.getpid()]) - own) < 0.05  # /proc agrees with os.times for this process
