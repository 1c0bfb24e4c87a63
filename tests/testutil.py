"""Helpers that test folders share (``from tests.testutil import ...``).

* :func:`lone_env`: the environment of one in-process run (no launcher variables, DeepSpeed on the CPU, offline).
* :func:`tiny_overrides`: the overrides that make launch/configs/tiny.toml fast on given folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "launch/configs/tiny.toml"
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def lone_env(mp: pytest.MonkeyPatch) -> None:
    """train() fills in the launcher's variables for a lone process: keep them out of other tests."""
    for name in DIST_ENV:
        mp.delenv(name, raising=False)
    mp.setenv("DS_ACCELERATOR", "cpu")
    mp.setenv("HF_HUB_OFFLINE", "1")


def tiny_overrides(folders: list[str], out_dir: Path, *more: str) -> list[str]:
    """tiny.toml on ``folders``, writing to ``out_dir``: no loader workers, batches of 6, a 60 s collective timeout."""
    return [
        f"data.domains={json.dumps(folders)}",
        f"run.out_dir={out_dir}",
        "data.stream.num_workers=0",
        "data.stream.batch_size=6",
        "engine.process_group_timeout_s=60",
        *more,
    ]
