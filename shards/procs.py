"""Processes: a record naming this process, whether a recorded process still runs, and pool workers that die with
the process that started them.

A holder record (host, pid, the process's start time, when, the command line) is what a lock file
(:mod:`pretrain.lock`) or a temporary output folder (:mod:`shards.outdir`) says about its writer; :func:`is_stale`
tells a dead writer's leftovers from a live writer's, and never judges a process of another host.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1
"""prctl option (linux/prctl.h): the signal this process gets when the thread that created it ends."""


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None where that cannot be read: a pid
    that a dead process held and a later process reuses is told apart by it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name in parentheses


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def holder_record() -> dict[str, Any]:
    """What this process writes into a lock or pid file it takes."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": process_start(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(sys.argv),
    }


def describe(holder: dict[str, Any]) -> str:
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}: {holder.get('command')}"


def is_stale(holder: dict[str, Any]) -> bool:
    """True when the holder is a process of this host that is no longer running (never for another host's)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    pid = holder["pid"]
    if pid == os.getpid():  # not held by this process (its holders know theirs): a dead process's pid, reused by us
        return True
    started = holder.get("started")
    return not alive(pid) or (started is not None and process_start(pid) not in (None, started))


def die_with_parent(parent: int) -> None:
    """Initializer of pool worker processes: be killed when the process that started the pool dies, even by SIGKILL
    (Linux: ``prctl(PR_SET_PDEATHSIG)``; elsewhere a thread polls the parent), and leave Ctrl-C (sent to the whole
    process group) and SIGTERM handling to the parent: a forked worker inherits the parent's Python handlers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        threading.Thread(target=_exit_when_gone, args=(parent,), daemon=True).start()
    if not alive(parent):  # it died before the death signal was armed
        os._exit(1)


def _exit_when_gone(parent: int) -> None:
    while alive(parent):
        time.sleep(0.5)
    os._exit(1)
