"""Helpers that test folders share (``from tests.testutil import ...``).

* :func:`lone_env`: the environment of one in-process run (no launcher variables, DeepSpeed on the CPU, offline).
* :func:`tiny_overrides`: the overrides that make launch/configs/tiny.toml fast on given folders.
* :func:`hold_lock`: a folder locked by another process, as :mod:`pretrain.lock` writes it; :func:`other_process`:
  a live process of this host to name as the holder.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import socket
import subprocess
from collections.abc import Callable, Iterator
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


def hold_lock(folder: Path, pid: int, host: str | None = None) -> dict[str, object]:
    """Lock ``folder`` in the name of process ``pid`` of ``host`` (default: this host), as another run would."""
    folder.mkdir(parents=True, exist_ok=True)
    holder = {"host": host or socket.gethostname(), "pid": pid, "since": "2025-01-02 03:04:05 +0000",
              "command": "python -m pretrain --config other.toml"}  # fmt: skip
    (folder / ".lock").write_text(json.dumps(holder))
    return holder


@contextlib.contextmanager
def other_process() -> Iterator[subprocess.Popen]:
    """A live process of this host that is not this one (a lock holder that is running), killed at the end."""
    proc = subprocess.Popen(["sleep", "600"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def fork_two_ranks(target: Callable[..., None], more: Callable[[int], tuple] = lambda rank: (),
                   timeout_s: float = 120) -> list[int | None]:  # fmt: skip
    """Fork ranks 0 and 1 of ``target(rank, port, *more(rank))`` (a free local port for their rendezvous; the
    parent's imports are inherited); their exit codes (None for one killed after ``timeout_s``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fork = multiprocessing.get_context("fork")
    ranks = [fork.Process(target=target, args=(rank, port, *more(rank))) for rank in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=timeout_s)
        if p.exitcode is None:
            p.kill()
    return [p.exitcode for p in ranks]
