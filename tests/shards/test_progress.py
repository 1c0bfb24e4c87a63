"""shards.progress: a bar on a terminal, periodic log lines elsewhere (a fake clock), nothing when disabled."""

from __future__ import annotations

import io
import logging

import pytest
from tqdm import tqdm

from shards import progress
from shards.progress import LogProgress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_long_phase_logs_after_the_first_interval_then_periodically_and_at_its_end(caplog) -> None:
    clock = Clock()
    caplog.set_level(logging.INFO, logger="shards.progress")
    with LogProgress(total=100, desc="encoding books", unit="item", clock=clock, first_s=10, every_s=30) as p:
        for _ in range(100):
            clock.now += 1.0  # 1 item/s: 100 s in all
            p.update()
    assert caplog.messages == [
        "encoding books: 10/100 item (10 %), 10 s, 1 item/s, about 90 s left",
        "encoding books: 40/100 item (40 %), 40 s, 1 item/s, about 60 s left",
        "encoding books: 70/100 item (70 %), 70 s, 1 item/s, about 30 s left",
        "encoding books: 100/100 item (100 %) done in 100 s",
    ]


def test_a_short_phase_logs_nothing(caplog) -> None:
    clock = Clock()
    caplog.set_level(logging.INFO, logger="shards.progress")
    for _ in LogProgress(range(50), desc="ranking", unit="user", clock=clock):
        clock.now += 0.1  # 5 s in all, under LOG_AFTER_S
    assert caplog.messages == []


def test_iteration_counts_and_logs_slow_steps_in_seconds_per_unit(caplog) -> None:
    clock = Clock()
    caplog.set_level(logging.INFO, logger="shards.progress")
    for _ in LogProgress(["a", "b", "c"], desc="scaling cells", unit="cell", clock=clock, first_s=0, every_s=0):
        clock.now += 120.0
    assert caplog.messages == [
        "scaling cells: 1/3 cell (33 %), 120 s, 120 s/cell, about 240 s left",
        "scaling cells: 2/3 cell (67 %), 240 s, 120 s/cell, about 120 s left",
        "scaling cells: 3/3 cell (100 %) done in 360 s",
    ]


def test_without_a_total_and_in_bytes() -> None:
    clock = Clock()
    p = LogProgress(desc="read", unit="line", clock=clock)
    p.update(1234)
    clock.now = 2.0
    assert p.line(clock.now) == "read: 1,234 line, 2 s, 617 line/s"
    b = LogProgress(total=4_000_000, desc="x.csv", unit="B", unit_scale=True, clock=clock)
    b.update(1_000_000)
    clock.now = 4.0
    assert b.line(clock.now) == "x.csv: 977kB/3.81MB (25 %), 2 s, 488kB/s, about 6 s left"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_draws_on_a_terminal_logs_elsewhere_and_is_silent_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert isinstance(progress.bar(total=3, desc="x"), LogProgress)
    off = progress.bar(total=3, enabled=False)
    assert isinstance(off, tqdm) and off.disable
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    drawn = progress.bar(range(3), total=3, desc="drawn")
    assert isinstance(drawn, tqdm) and not drawn.disable
    assert list(drawn) == [0, 1, 2] and "drawn" in terminal.getvalue()
