"""Output folders written whole or not at all (built shards, subsets, model exports).

:func:`atomic_folder` writes into a hidden sibling, ``.NAME.tmp-PID``, renamed to ``NAME`` only when the writing
succeeded, so no failure or kill leaves a complete-looking output. Before it starts it checks the free space
(:func:`check_free_space`); a disk that fills up anyway is one :class:`~shards.errors.InputError` naming the folder
and the sizes, the temporary folder removed; and SIGTERM or Ctrl-C (:func:`interruptible`) removes it too. Only
SIGKILL (or a lost machine) can leave it behind: it holds a pid file (:data:`OWNER`, a holder record of
:mod:`shards.procs`), so the next write into the same place removes the leftovers of a writer that is no longer
running, and refuses to start beside one that still is.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import InputError
from .procs import describe, holder_record, is_stale

log = logging.getLogger(__name__)

TMP_INFIX = ".tmp-"
OWNER = ".writer.json"
"""The pid file inside a temporary folder: the holder record of the process writing it (removed before the rename)."""
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def check_free_space(folder: str | Path, needed: int, what: str, margin: float = 0.1) -> None:
    """An :class:`InputError` before writing ``needed`` bytes of ``what`` into ``folder`` when its file system has
    less free space than that plus ``margin``: failing early beats a full disk half-way through."""
    free = shutil.disk_usage(folder).free
    if free < needed * (1 + margin):
        raise InputError(
            f"not enough free space in {folder} for {what}: about {needed / 2**20:,.1f} MiB needed, "
            f"{free / 2**20:,.1f} MiB free"
        )


def disk_full(e: BaseException) -> bool:
    """Whether ``e`` says the disk (or the user's quota) is full: an OSError, or an error of a writer in another
    language that carries one in its message (safetensors: ``... (os error 28)``)."""
    if isinstance(e, OSError):
        return e.errno in DISK_FULL
    return any(f"(os error {code})" in str(e) for code in DISK_FULL)


def _full_message(folder: Path, needed: int | None, what: str) -> str:
    free = shutil.disk_usage(folder).free
    estimate = "" if needed is None else f"about {needed / 2**20:,.1f} MiB needed, "
    return (f"the disk filled up while writing {what} into {folder}: {estimate}{free / 2**20:,.1f} MiB free (the "
            f"partial output was removed; free some space and run again)")  # fmt: skip


@contextlib.contextmanager
def atomic_folder(out_dir: Path, needed: int | None = None, what: str | None = None) -> Iterator[Path]:
    """A hidden sibling of ``out_dir`` to write into, renamed to ``out_dir`` (replacing it) when the block ends
    without an error and removed when it raises: a crash never leaves a complete-looking output. With ``needed``
    (bytes), the free space is checked first; a full disk met while writing ``what`` is an :class:`InputError`."""
    out_dir = Path(out_dir)
    what = what or str(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}{TMP_INFIX}{os.getpid()}"
    remove_stale_temps(out_dir, keep=tmp)
    if needed is not None:
        check_free_space(out_dir.parent, needed, what)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / OWNER).write_text(json.dumps(holder_record()) + "\n", encoding="utf-8")
        yield tmp
        (tmp / OWNER).unlink()
        _replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise InputError(_full_message(out_dir.parent, needed, what)) from None
        raise


def remove_stale_temps(out_dir: Path, keep: Path | None = None) -> None:
    """Remove the temporary folders of earlier writers of ``out_dir`` that are no longer running; an
    :class:`InputError` when one still is (two writers would replace each other's output); a warning, saying how
    to remove it, for one whose writer cannot be told (no pid file: killed while creating it)."""
    for tmp in sorted(out_dir.parent.glob(f".{out_dir.name}{TMP_INFIX}*")):
        if tmp == keep or not tmp.is_dir():
            continue
        holder = _owner(tmp)
        if holder and is_stale(holder):
            log.warning("removing %s, left by a writer that is no longer running (%s)", tmp, describe(holder))
            shutil.rmtree(tmp, ignore_errors=True)
        elif holder and holder.get("host"):
            raise InputError(f"{out_dir} is being written by another process ({describe(holder)}); wait for it to "
                             f"end, or, if it is dead (on another host), remove {tmp}")  # fmt: skip
        else:
            log.warning("%s: a temporary folder of an earlier write whose writer is unknown; if no process is "
                        "writing %s, remove it: rm -r '%s'", tmp, out_dir, tmp)  # fmt: skip


def _owner(tmp: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads((tmp / OWNER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _replace(new: Path, target: Path) -> None:
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old)
    else:
        os.rename(new, target)


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so the ``finally`` and ``except`` blocks on its way out run (as they
    do for Ctrl-C's KeyboardInterrupt): the temporary folder of :func:`atomic_folder` is removed."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(f"stopped by signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Interrupted` (a KeyboardInterrupt) instead of ending the process on
    the spot (main thread only; elsewhere the block changes nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
