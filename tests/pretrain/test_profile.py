"""python -m benchmarks.step --profile: every phase of a training step is timed, and the shares add up to the step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.profile import BUCKETS, PhaseClock
from benchmarks.step import main
from tests.testutil import TINY


def test_profile_times_every_phase_and_the_shares_add_up(folders, tmp_path: Path, capsys, lone_process) -> None:
    out = tmp_path / "profile.json"
    frozen = [f"model.{t}.{k}" for t in ("text", "image") for k in ("trainable=top", "top_layers=1")]
    argv = ["--profile", "--domains", *folders, "--config", str(TINY), "--steps", "2", "--warmup", "1"]
    argv += ["--json", str(out), "data.stream.batch_size=6", "engine.process_group_timeout_s=60", *frozen]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Step profile: 2 steps after 1 warm-up" in printed
    assert all(f"  {bucket} " in printed for bucket in BUCKETS)
    r = json.loads(out.read_text())["profile"]
    assert list(r["shares"]) == list(BUCKETS) and r["num_workers"] == 0
    assert sum(r["shares"].values()) == pytest.approx(1.0, abs=1e-9)
    assert sum(r["seconds_per_step"].values()) == pytest.approx(r["step_seconds"], rel=1e-9)
    assert all(share > 0 for share in r["shares"].values()), r["shares"]  # every phase ran in the timed steps


def test_nested_phases_count_once() -> None:
    clock = PhaseClock()
    clock.start()
    with clock.phase("data wait"):
        with clock.phase("tokenize"):
            pass
        with clock.phase("image decode"):
            pass
    clock.stop()
    assert sum(clock.seconds.values()) == pytest.approx(clock.wall, rel=1e-9)
    assert all(v >= 0 for v in clock.seconds.values())
    with clock.phase("backward"):  # the clock stopped: not counted
        pass
    assert clock.seconds["backward"] == 0
