"""Progress bars: shown on a terminal, silent in logs and CI (tqdm's ``disable=None``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def bar(iterable: Iterable | None = None, *, enabled: bool = True, **kw: Any) -> tqdm:
    """A tqdm bar that draws only when ``enabled`` and standard error is a terminal."""
    return tqdm(iterable, disable=None if enabled else True, leave=False, dynamic_ncols=True, **kw)
