"""One run per output folder (pretrain.lock): a live holder refuses, a dead one's lock is taken over, another host's
is honoured unless forced, a process may take its own lock again, and the file goes at the end."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import pytest

from pretrain import lock
from tests.testutil import hold_lock, other_process


def test_a_lock_names_its_holder_is_reentrant_and_goes_at_the_end(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with lock.locked(folder, what="run.out_dir") as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["since"] and "command" in holder
        with lock.locked(folder):  # the engine inside finetune takes it again
            pass
        assert path.is_file()
    assert not (folder / lock.LOCK).exists()


def test_a_live_holder_refuses_naming_the_folder_and_the_holder(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with other_process() as proc:
        holder = hold_lock(folder, proc.pid)
        with pytest.raises(ValueError) as refused:
            lock.acquire(folder, what="run.out_dir")
        message = str(refused.value)
        assert message.startswith(f"run.out_dir {folder} is held by another process (host {holder['host']}, pid "
                                  f"{proc.pid}, since 2025-01-02 03:04:05 +0000: python -m pretrain")  # fmt: skip
        assert "run.force_unlock=true" in message and "\n" not in message
    assert json.loads((folder / lock.LOCK).read_text()) == holder  # untouched


def test_a_dead_holders_lock_is_taken_over(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "run"
    with other_process() as proc:
        pid = proc.pid
    hold_lock(folder, pid)  # that process has ended
    with caplog.at_level(logging.WARNING, logger="pretrain.lock"), lock.locked(folder) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"taking over the lock of a run that is no longer running (host {socket.gethostname()}, pid {pid}" in (
        caplog.text
    )
    assert not path.exists()


def test_a_reused_pid_is_told_apart_by_its_start_time(tmp_path: Path) -> None:
    with other_process() as proc:
        holder = hold_lock(tmp_path, proc.pid)
        assert not lock.is_stale(holder)  # no start time recorded: the pid alone decides
        assert not lock.is_stale({**holder, "started": lock._process_start(proc.pid)})
        assert lock.is_stale({**holder, "started": "1"})  # that pid now belongs to a later process


def test_another_hosts_lock_is_honoured_unless_forced(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "study"
    hold_lock(folder, 1, host="node-that-died")
    with pytest.raises(ValueError, match=r"host node-that-died, pid 1, .*scaling\.force_unlock=true"):
        lock.acquire(folder, what="scaling.out_dir")
    with caplog.at_level(logging.WARNING, logger="pretrain.lock"), lock.locked(folder, force=True) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "breaking the lock of host node-that-died" in caplog.text
