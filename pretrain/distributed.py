"""The process group: start-up (with DeepSpeed's import workarounds), rank helpers, barriers, padded all-gathers.

Every module of ours that needs the process group comes here: the engine and ``python -m pretrain.evaluate`` start
it with :func:`init_distributed`, the checkpoints, exports and rankings ask :func:`rank` / :func:`world_size` and
meet at :func:`barrier`, and the three gathers of rows whose count differs across ranks (the loss's negatives, the
encoded catalog, the per-user ranks) are one :func:`all_gather_rows`. (``shards`` imports nothing of ours: its
stream keeps its own rank lookup, which also reads the launcher's variables before a group exists.)

On CPU the backend is gloo (DeepSpeed's ``cpu`` accelerator), on GPUs NCCL. One process without a launcher gets
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT defaulted here when it trains (DeepSpeed would otherwise
look for MPI).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from types import ModuleType

import torch


@dataclass(frozen=True)
class Dist:
    """This process's place in the process group (rank 0 of 1 without one)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def rng_devices(self) -> list[int]:
        """The CUDA devices whose generators ``torch.random.fork_rng`` must fork with the CPU's (none on CPU)."""
        return [self.device.index or 0] if self.device.type == "cuda" else []


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (MASTER_PORT of a single process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefer_own_ninja() -> None:
    """Put this interpreter's bin folder (with the ninja that DeepSpeed installs) first on PATH. DeepSpeed JIT-builds
    its C++ comm op into one shared cache (~/.cache/torch_extensions); a process that found the system's ninja
    (1.11 here) and one that found the venv's (1.13) hash the build commands differently, so each rebuilt the op
    the other had built: 70-90 s per switch on 2 cores, measured when runs started with and without the venv on
    PATH alternated."""
    own = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(own, "ninja")):
        parts = os.environ.get("PATH", "").split(os.pathsep)
        if parts[:1] != [own]:
            os.environ["PATH"] = os.pathsep.join([own, *(p for p in parts if p != own)])


def import_deepspeed() -> ModuleType:
    """DeepSpeed, with its ``cpu`` accelerator where there is no GPU (it must be chosen before the first import)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _prefer_own_ninja()
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would drown ours
    # DeepSpeed's ZeRO collectives call torch APIs that torch 2.13 deprecates: one warning per call otherwise
    warnings.filterwarnings(
        "ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", FutureWarning
    )
    return deepspeed


def init_distributed(timeout_s: float, *, deepspeed: bool = True) -> Dist:
    """Join (or create) the process group: gloo on CPU, NCCL on GPUs; a group that already exists (an earlier run
    in this process) is reused as it is, until :func:`shutdown`.

    ``deepspeed=True`` (training): started through DeepSpeed, which keeps its own handles on it; one process without
    a launcher gets a group of one (its variables defaulted here). ``deepspeed=False`` (evaluation): started by
    torch alone (DeepSpeed is not imported), and only under a launcher with WORLD_SIZE > 1; a single process gets no
    group (rank 0 of 1)."""
    cuda = torch.cuda.is_available()
    if deepspeed:
        if "RANK" not in os.environ:  # one process, no launcher: DeepSpeed would otherwise look for MPI
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("LOCAL_RANK", "0")
        ds = import_deepspeed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if (deepspeed or int(os.environ.get("WORLD_SIZE", "1")) > 1) and not torch.distributed.is_initialized():
        backend, timeout = "nccl" if cuda else "gloo", timedelta(seconds=timeout_s)
        if deepspeed:
            ds.init_distributed(dist_backend=backend, timeout=timeout)
        else:
            torch.distributed.init_process_group(backend, timeout=timeout)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(rank(), world_size(), local_rank, device)


def rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    """The process group's size (1 without one)."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def ranks() -> tuple[int, int]:
    """(:func:`rank`, :func:`world_size`)."""
    return rank(), world_size()


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_gather_rows(
    x: torch.Tensor, *, fill: float = 0, trim: bool = True, differentiable: bool = False
) -> torch.Tensor:
    """Every rank's ``x`` (the same trailing shape and dtype on every rank, any number of rows), concatenated along
    dim 0 in rank order; every rank must call it. all_gather needs equal shapes, so each rank's rows are padded to
    the largest count with ``fill``; ``trim`` takes the padding out again (else each rank's block is the largest
    count long). ``differentiable``: gradients flow back to the local rows
    (``torch.distributed.nn.functional.all_gather``). Without a group of several ranks, ``x`` itself."""
    if world_size() == 1:
        return x
    sizes = _row_counts(x.shape[0], x.device)
    pad = max(sizes) - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_full((pad, *x.shape[1:]), fill)])
    if differentiable:
        from torch.distributed.nn.functional import all_gather

        parts = list(all_gather(x))
    else:
        parts = [torch.empty_like(x) for _ in sizes]
        torch.distributed.all_gather(parts, x)
    if trim:
        parts = [p[:n] for p, n in zip(parts, sizes)]
    return torch.cat(parts)


def _row_counts(rows: int, device: torch.device) -> list[int]:
    """Every rank's ``rows``, in rank order."""
    count = torch.tensor([rows], device=device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    torch.distributed.all_gather(counts, count)
    return [int(c) for c in counts]


class GatherNegatives:
    """``loss.gather_negatives``: every rank's item table, padded to the largest (the model's ``Gather``).

    Integer tensors (item ids) are padded with -1, which the loss masks; floating ones with 0. The padding stays,
    so rank r's rows start at r times the largest table (:meth:`offset`). Gradients flow back to the local rows."""

    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank, self.device = rank, device

    def offset(self, rows: int) -> int:
        return self.rank * max(_row_counts(rows, self.device))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_rows(x, fill=0 if x.is_floating_point() else -1, trim=False, differentiable=True)


class CollectiveError(RuntimeError):
    """A rank died or hung: this one's collective failed, or waited past the process-group timeout."""


@contextlib.contextmanager
def collective_failures(rank: int, timeout_s: float) -> Iterator[None]:
    """Turn a failed collective inside the block (gloo's or NCCL's RuntimeError) into a :class:`CollectiveError`
    that says what it means; other errors pass as they are."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, torch.distributed.DistError) or any(b in str(e) for b in ("gloo", "NCCL", "Gloo")):
            raise CollectiveError(f"rank {rank}: a collective failed: another rank died or stopped responding "
                                  f"(engine.process_group_timeout_s={timeout_s:g}); see the logs of the other "
                                  f"ranks. {str(e).strip().splitlines()[0]}") from e  # fmt: skip
        raise


def shutdown() -> None:
    """Leave the process group; through DeepSpeed when it joined it, so that it drops its handles too (a later
    :func:`init_distributed` in this process then starts a new one)."""
    if not torch.distributed.is_initialized():
        return
    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None and comm.cdb is not None:
        comm.destroy_process_group()
    else:
        torch.distributed.destroy_process_group()
