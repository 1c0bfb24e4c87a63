"""Fault injection for tests/reliability: Python runs this at the start of every process that has this folder on
its PYTHONPATH (the tests put it there for the launchers they start; it is never on the path otherwise).

``MOMREC_FAULT="<what>:<where>:<step>:<rank>"`` makes rank ``<rank>`` (its ``RANK``) do ``<what>`` to itself:
``kill`` (SIGKILL), ``hang`` (SIGSTOP, after writing its pid to ``$MOMREC_FAULT_PIDFILE``) or ``raise`` (a
RuntimeError of this rank alone, like a bug or bad input only it meets), ``<where>``:

* ``train``: right after optimizer step ``<step>``, before its logging and checkpoint;
* ``checkpoint``: in the middle of saving the step-``<step>`` checkpoint: every rank's DeepSpeed files and rank
  files are written, ``momrec.json`` and the ``latest`` pointer are not (rank 0 writes those: use rank 0).
"""

from __future__ import annotations

import os
import signal
from typing import Any


def _act(what: str) -> None:
    if what == "raise":
        raise RuntimeError(f"injected fault on rank {os.environ.get('RANK')}")
    if what == "hang":
        with open(os.environ["MOMREC_FAULT_PIDFILE"], "w") as f:
            f.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def _install(what: str, where: str, step: int) -> None:
    from pretrain import checkpoint, engine

    if where == "train":
        after_step = engine._after_step

        def faulty_after_step(run: Any, bar: Any) -> Any:
            if run.step == step:
                _act(what)
            return after_step(run, bar)

        engine._after_step = faulty_after_step
    else:
        write_state = checkpoint._write_state

        def faulty_write_state(folder: Any, cfg: Any, at: int) -> None:
            if at == step:
                _act(what)
            write_state(folder, cfg, at)

        checkpoint._write_state = faulty_write_state


_spec = os.environ.get("MOMREC_FAULT", "").split(":")
if len(_spec) == 4 and os.environ.get("RANK") == _spec[3]:
    _install(_spec[0], _spec[1], int(_spec[2]))
