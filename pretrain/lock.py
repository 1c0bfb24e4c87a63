"""One run per output folder: a lock file, ``FOLDER/.lock``, that a run holds from its start to its end.

Two runs writing into one folder would interleave their metrics, overwrite each other's checkpoints and exports,
and both exit 0. The lock is a JSON file naming its holder (host, pid, the process's start time, when it was
taken, the command line), created with ``O_CREAT | O_EXCL``, so of two processes exactly one gets it. The holder
removes it at its end, also when the run fails; a process killed outright (SIGKILL, a lost node) leaves it behind:

* a lock of a process on this host that is no longer running (its pid is gone, or now belongs to a process that
  started later) is stale: it is logged and taken over, so ``--resume`` after a crash just works;
* a lock of a process on another host cannot be checked from here: it is honoured unless the user passes
  ``force`` (``run.force_unlock=true``, ``--force-unlock``; ``scaling.force_unlock=true`` for a study).

Under several ranks only rank 0 takes the lock (:func:`rank0_lock`) and tells the others the verdict, so every
rank stops alike. A process may take a lock it already holds again (finetune holds its run folder's lock around the
engine, which takes it too); it is released when the outermost holder lets go.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shards.procs import describe, holder_record, is_stale  # the holder records, shared with shards' temp folders
from shards.procs import process_start as _process_start  # noqa: F401  (its former home: tests use the name)

log = logging.getLogger(__name__)

LOCK = ".lock"
"""The lock file's name inside the folder it locks."""
_HELD: dict[Path, int] = {}
"""Lock files this process holds -> how many times it took each (re-entrant holding)."""
_FORCE_HINT = {
    "run.out_dir": "run.force_unlock=true (or --force-unlock)",
    "scaling.out_dir": "scaling.force_unlock=true",
}
"""How to force the unlock of the folder of each config key (in the refusal's message)."""


def _read(path: Path) -> dict[str, Any] | None:
    """The holder in lock file ``path``; None when it is gone; {} when it cannot be read (being written?)."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _create(path: Path) -> bool:
    """Create lock file ``path`` holding :func:`holder_record`, atomically; False when it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(holder_record()) + "\n")
    return True


def _take_over(path: Path, holder: dict[str, Any], what: str, folder: Path, force: bool) -> None:
    """Remove another holder's lock when it is stale or ``force``; else the ValueError that refuses the run."""
    if is_stale(holder):
        log.warning("%s %s: taking over the lock of a run that is no longer running (%s)", what, folder,
                    describe(holder))  # fmt: skip
    elif force:
        log.warning("%s %s: breaking the lock of %s (forced)", what, folder, describe(holder) if holder else path)
    elif holder:
        raise ValueError(f"{what} {folder} is held by another process ({describe(holder)}); wait for it, choose "
                         f"another {what}, or, if that process is dead (on another host), force the unlock: "
                         f"{_FORCE_HINT.get(what, 'force_unlock=true')}")  # fmt: skip
    else:
        raise ValueError(f"{what} {folder} is locked ({path} cannot be read); if no run uses the folder, force the "
                         f"unlock: {_FORCE_HINT.get(what, 'force_unlock=true')}")  # fmt: skip
    if _read(path) == holder:  # not meanwhile taken over by another process that judged it alike
        path.unlink(missing_ok=True)


def acquire(folder: str | os.PathLike, *, force: bool = False, what: str = "folder") -> Path:
    """Take ``folder``'s lock (creating the folder), or raise a ValueError naming the folder and its holder.
    ``what`` names the folder's config key in messages. Returns the lock file; give it back with :func:`release`."""
    folder = Path(folder)
    path = (folder / LOCK).resolve()
    if path in _HELD:
        _HELD[path] += 1
        return path
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # another process may take over or release between our tries
        if _create(path):
            _HELD[path] = 1
            return path
        holder = _read(path)
        if holder is not None:
            _take_over(path, holder, what, folder, force)
    raise ValueError(f"{what} {folder}: could not take the lock {path}: other processes keep taking it")


def release(path: Path) -> None:
    """Give back a lock taken with :func:`acquire`; the file goes when the outermost holder lets go (and only if it
    is still ours: a forced unlock may have handed it to another run)."""
    _HELD[path] -= 1
    if _HELD[path]:
        return
    del _HELD[path]
    holder = _read(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(folder: str | os.PathLike, *, force: bool = False, what: str = "folder") -> Iterator[Path]:
    """``folder``'s lock, held for the ``with`` block (one process; see :func:`acquire`)."""
    path = acquire(folder, force=force, what=what)
    try:
        yield path
    finally:
        release(path)


@contextlib.contextmanager
def rank0_lock(folder: str | os.PathLike, *, force: bool = False, what: str = "folder") -> Iterator[None]:
    """``folder``'s lock, taken by rank 0 only; the verdict is broadcast, so every rank raises the same ValueError
    when it is refused (and none waits in a collective that rank 0 never reaches). Every rank must call it."""
    import torch

    from .distributed import rank, world_size  # torch: only where a run takes the lock

    several = world_size() > 1
    path, verdict = None, [None]
    if rank() == 0:
        try:
            path = acquire(folder, force=force, what=what)
        except ValueError as e:
            verdict = [str(e)]
    if several:
        torch.distributed.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise ValueError(verdict[0])
    try:
        yield
    finally:
        if path is not None:
            release(path)
