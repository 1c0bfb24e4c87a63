"""Progress of long phases: a tqdm bar on a terminal, periodic log lines where standard error is not one.

:func:`bar` is the one helper every phase uses (building, subsets, catalog encoding, ranking, the scaling study).
On a terminal it draws tqdm's bar; in a log file or CI, where a bar is noise, a phase that runs longer than
:data:`LOG_AFTER_S` logs a line every :data:`LOG_EVERY_S` (count, share of the total, rate, time left) and one when it
ends, so a long phase is never silent and a short one adds nothing. Lines are logged (logger ``shards.progress``,
INFO) only when an update or iteration happens: there is no timer thread.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

LOG_AFTER_S = 10.0
"""Seconds a phase runs before its first progress line (a shorter phase logs none)."""
LOG_EVERY_S = 30.0
"""Seconds between progress lines after the first."""


def bar(iterable: Iterable | None = None, *, enabled: bool = True, **kw: Any) -> tqdm | LogProgress:
    """Progress of a phase: a tqdm bar when ``enabled`` and standard error is a terminal, periodic log lines
    (:class:`LogProgress`) when ``enabled`` and it is not, nothing otherwise. ``kw``: tqdm's ``total``, ``desc``,
    ``unit``, ``unit_scale`` (the log lines use these four)."""
    if enabled and not _terminal():
        return LogProgress(iterable, **kw)
    return tqdm(iterable, disable=not enabled, leave=False, dynamic_ncols=True, **kw)


def _terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class LogProgress:
    """The part of tqdm's interface the phases use (iterate, :meth:`update`, :meth:`close`, ``with``), reporting in
    log lines: the first after ``first_s`` seconds, then every ``every_s``, and a last one at the end when any was
    logged. ``clock`` is injectable for tests."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: float | None = None,
        desc: str = "",
        unit: str = "it",
        unit_scale: bool = False,
        first_s: float = LOG_AFTER_S,
        every_s: float = LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit, self.unit_scale = iterable, total, desc, unit, unit_scale
        self.every_s, self.clock, self.logger = every_s, clock, logger
        self.n: float = 0
        self.start = clock()
        self.due = self.start + first_s
        self.logged = self.closed = False

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "LogProgress without an iterable: call update()"
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        """Count ``n`` more units; log a line when one is due."""
        self.n += n
        now = self.clock()
        if now >= self.due and not (self.total and self.n >= self.total):  # the end: close() says it
            self._log(now)
            self.due = now + self.every_s

    def close(self) -> None:
        """End the phase: a last line (with its time) when it logged any before."""
        if self.logged and not self.closed:
            self._log(self.clock(), done=True)
        self.closed = True

    def line(self, now: float, done: bool = False) -> str:
        """``desc: 1,200/4,000 item (30 %), 41 s, 29 item/s, about 96 s left`` (no share or time left without a
        total; ``desc: 4,000/4,000 item (100 %) done in 137 s`` at the end)."""
        elapsed = max(now - self.start, 0.0)
        total = "" if self.total is None else f"/{self._size(self.total)}"
        if self.unit_scale:  # 977kB/3.81MB
            count = f"{self._size(self.n)}{self.unit}{total and total + self.unit}"
        else:  # 1,200/4,000 item
            count = f"{self._size(self.n)}{total} {self.unit}"
        parts = [count]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f} %)"
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if done:
            return f"{self.desc}: {parts[0]} done in {elapsed:.0f} s"
        sep = "" if self.unit_scale else " "
        speed = f"{self._size(rate)}{sep}{self.unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.0f} s/{self.unit}"
        parts += [f"{elapsed:.0f} s", speed]
        if self.total and rate > 0:
            parts.append(f"about {max(self.total - self.n, 0) / rate:.0f} s left")
        return f"{self.desc}: " + ", ".join(parts)

    def _log(self, now: float, done: bool = False) -> None:
        self.logger.info("%s", self.line(now, done))
        self.logged = True

    def _size(self, x: float) -> str:
        if self.unit_scale:
            return tqdm.format_sizeof(x, divisor=1024 if self.unit == "B" else 1000)
        return f"{x:,.0f}" if x >= 10 or float(x).is_integer() else f"{x:.2g}"
