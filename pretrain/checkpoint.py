"""Checkpoints that resume exactly: DeepSpeed's states with our stream position and RNGs, and what a resume may change.

Layout of ``run.out_dir/checkpoints``::

    step00000100/               DeepSpeed's files: model, optimizer and scheduler states (per rank / partition)
        momrec.json             rank 0: step, world size, the resolved config (``to_dict``)
        rank00000.json          each rank: its data-stream position, python ``random`` and numpy RNG states
        rank00000.safetensors   each rank: torch CPU (and CUDA) generator states, as uint8 tensors
    latest                      the tag of the newest complete checkpoint

``latest`` is written last, after a barrier that every rank reaches only once its files are written, and
atomically (a temporary file renamed over it), so a save interrupted at any point leaves the previous checkpoint
as the latest; ``engine.load_checkpoint(dir)`` without a tag reads the same pointer. Resuming restores the model,
optimizer, schedule, the stream position and every RNG, so the next step's loss equals the uninterrupted run's.
A checkpoint resumed on another number of ranks keeps the model, optimizer and schedule exactly and the data
stream's epoch without repeats (:func:`load`); the losses go on, but not bit for bit.
Checkpoints assume a file system shared by all nodes (rank 0 writes the pointer and prunes).
Before a save, every rank checks that the file system has room for another checkpoint (the latest one's size)
and all of them stop with a clear error if any has not: a full disk is found before a half-written save.

The export that finetuning loads (``run.out_dir/model``) is :mod:`pretrain.export`'s.

Security: no checkpoint file is ever unpickled with code-running power. Our own files are JSON and safetensors.
DeepSpeed's own ``*.pt`` files are torch pickles, which its loader reads with ``torch.load(weights_only=False)``;
:func:`load` swaps the engine's checkpoint engine for :class:`SafeLoads`, which reads them with
``torch.load(weights_only=True)`` and allows exactly the DeepSpeed classes its ZeRO 0-3 files hold
(:data:`DEEPSPEED_SAFE_GLOBALS`): a file naming any other global (e.g. a crafted ``__reduce__`` payload) is refused
with a :class:`ValueError` naming it, before anything in it runs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from shards.outdir import check_free_space
from shards.stream import SequenceStream

from . import distributed, reshard
from .config import TrainConfig, from_dict, to_dict

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "momrec.json"
FORMAT = 1
_TAG = re.compile(r"step(\d{8})")
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""The only non-torch globals ``torch.load(weights_only=True)`` may rebuild from DeepSpeed's files (ZeRO 0-3, fp32 and
bf16, measured with ``torch.serialization.get_unsafe_globals_in_checkpoint``): plain enums, dataclasses and loss
scalers, rebuilt from their state without running any code of the file's choosing."""


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def _write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def latest_tag(out_dir: str | Path) -> str | None:
    """The tag ``latest`` points at, or None when there is no complete checkpoint."""
    pointer = checkpoint_dir(out_dir) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text(encoding="utf-8").strip()
    if not _TAG.fullmatch(tag) or not (checkpoint_dir(out_dir) / tag / STATE).is_file():
        raise ValueError(f"{pointer} names {tag!r}, which is not a complete checkpoint")
    return tag


RESUMABLE = (
    "run",
    "optim.max_steps",
    "optim.warmup_steps",
    "data.valid_domains",
    "engine.process_group_timeout_s",
    "model.feature_cache_dir",
    "model.text.cache_frozen",
    "model.image.cache_frozen",
    "optim.implementation",
)
"""Config keys (a section: every key in it) that ``--resume`` may change, logged when it does: how long the run
goes on (max_steps, and the warm-up with it), what it logs, validates and saves (``run``, also a moved out_dir),
how long a collective waits, where the feature cache lives and whether it is used (a frozen bottom gives the same
output either way; the default changed to true), and which of torch's AdamW kernels steps (the same update).
A change to any other key (the model, the training
data and how it is streamed, the loss, the optimizer's other settings, engine.seed, the ZeRO stage and precision,
finetune's source and mode) would continue the checkpoint as something it is not: :func:`check_resume` refuses it.
data.stream.num_workers too: the stream's epoch plan deals batches to the workers, so a saved position means
nothing under another worker count (shards.stream refuses it as well)."""
_UNSET = "(unset)"


def _flat(tree: Any, path: str = "") -> dict[str, Any]:
    """Dotted key -> leaf value of a :func:`~pretrain.config.to_dict` table (an empty table is a leaf)."""
    if not isinstance(tree, dict) or not tree:
        return {path: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{path}.{key}" if path else key))
    return out


def config_changes(old: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old value, new value) of every leaf that differs."""
    a, b = _flat(to_dict(old)), _flat(to_dict(new))
    keys = sorted(a.keys() | b.keys())
    return {k: (a.get(k, _UNSET), b.get(k, _UNSET)) for k in keys if a.get(k, _UNSET) != b.get(k, _UNSET)}


def resumable(key: str) -> bool:
    """Whether ``--resume`` may change dotted config key ``key`` (:data:`RESUMABLE`)."""
    return any(key == r or key.startswith(r + ".") for r in RESUMABLE)


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k} {json.dumps(old)} -> {json.dumps(new)}" for k, (old, new) in changes.items())


def check_resume(cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Compare ``cfg`` with the config of the checkpoint it resumes (the latest in run.out_dir): a ValueError names
    every changed key that is not :func:`resumable`, with its old and new values; returns the resumable changes."""
    folder = checkpoint_dir(cfg.run.out_dir) / str(latest_tag(cfg.run.out_dir))
    saved = from_dict(json.loads((folder / STATE).read_text(encoding="utf-8"))["config"], type(cfg))
    changes = config_changes(saved, cfg)
    refused = {k: v for k, v in changes.items() if not resumable(k)}
    if refused:
        raise ValueError(f"--resume: {folder} was saved with another config, and these keys change what it means: "
                         f"{describe_changes(refused)}; restore them, or start a new run.out_dir")  # fmt: skip
    return changes


def check_out_dir(cfg: TrainConfig) -> None:
    """Refuse to train over another run's checkpoints unless resuming."""
    folder = checkpoint_dir(cfg.run.out_dir)
    if not cfg.run.resume and folder.is_dir() and any(folder.iterdir()):
        raise ValueError(
            f"run.out_dir {cfg.run.out_dir!r} already holds checkpoints: pass --resume (run.resume=true) to continue "
            "that run, or choose another run.out_dir"
        )


# ---- RNG states --------------------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(torch generator states as uint8 tensors, python ``random`` and numpy states as JSON-able lists)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python_random": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- loading DeepSpeed's pickles without letting them run code ----------------------------------------


def _deepspeed_globals() -> list[Any]:
    out = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, attr = name.rsplit(".", 1)
        out.append(getattr(importlib.import_module(module), attr))
    return out


def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)`` allowing :data:`DEEPSPEED_SAFE_GLOBALS` only; a file that names any other
    global, or is not a readable torch file, is a ValueError naming it (nothing in it has run)."""
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: refused to load: it holds objects other than tensors and DeepSpeed's known state "
                         f"(a checkpoint from elsewhere?): {reason}") from None  # fmt: skip
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable checkpoint file ({e})") from None


class SafeLoads:
    """A DeepSpeed checkpoint engine that is the engine's own for everything but ``load``, which is
    :func:`safe_torch_load` (DeepSpeed's ``TorchCheckpointEngine.load`` passes ``weights_only=False``)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location)


def secure_loads(engine: Any) -> None:
    """Make every later ``engine.load_checkpoint`` read DeepSpeed's files with :func:`safe_torch_load`."""
    if not isinstance(engine.checkpoint_engine, SafeLoads):
        engine.checkpoint_engine = SafeLoads(engine.checkpoint_engine)


# ---- save and load ------------------------------------------------------------------------------------


def _write_rank_files(folder: Path, rank: int, stream: SequenceStream) -> None:
    tensors, meta = rng_state()
    safetensors.torch.save_file(tensors, str(folder / f"rank{rank:05d}.safetensors.tmp"))
    os.replace(folder / f"rank{rank:05d}.safetensors.tmp", folder / f"rank{rank:05d}.safetensors")
    _write_atomic(folder / f"rank{rank:05d}.json", json.dumps({**meta, "stream": stream.state_dict()}))


def _write_state(folder: Path, cfg: TrainConfig, step: int) -> None:
    world = distributed.world_size()
    doc = {"format": FORMAT, "step": step, "world_size": world, "config": to_dict(cfg)}
    _write_atomic(folder / STATE, json.dumps(doc, indent=1))


def _write_latest(ckpt: Path, tag: str) -> None:
    _write_atomic(ckpt / LATEST, tag + "\n")


def save(engine: Any, cfg: TrainConfig, stream: SequenceStream, step: int, out_dir: str | Path) -> Path:
    """Every rank: DeepSpeed's checkpoint, then our state; ``latest`` moves only once all ranks are done."""
    ckpt, tag, rank = checkpoint_dir(out_dir), tag_of(step), distributed.rank()
    folder = ckpt / tag
    _check_space(engine, ckpt)
    if rank == 0 and folder.exists():
        shutil.rmtree(folder)  # left by a save that crashed before the pointer moved: start it afresh
    distributed.barrier()
    engine.save_checkpoint(str(ckpt), tag=tag, save_latest=False)
    _write_rank_files(folder, rank, stream)
    if rank == 0:
        _write_state(folder, cfg, step)
    distributed.barrier()  # every rank's files are on disk
    if rank == 0:
        _write_latest(ckpt, tag)
        prune(ckpt, cfg.run.keep_checkpoints)
    return folder


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _check_space(engine: Any, ckpt: Path) -> None:
    """Every rank: fail before writing when the file system cannot hold another checkpoint (the size of the
    latest one, or, for the first, 16 bytes a parameter: weights and Adam's two moments in fp32, and a margin).
    The verdict is all-reduced, so every rank raises alike instead of some waiting in a barrier."""
    ckpt.mkdir(parents=True, exist_ok=True)
    tag = latest_tag(ckpt.parent)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())  # ZeRO-3: the full size
    needed = _folder_bytes(ckpt / tag) if tag else 16 * params
    try:
        check_free_space(ckpt, needed, "a checkpoint")
        short = 0
    except ValueError as e:
        short, message = 1, str(e)
    if torch.distributed.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        flag = torch.tensor([short], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and not short:
            message = f"not enough free space for a checkpoint on another rank (see its log) in {ckpt}"
        short = int(flag.item())
    if short:
        raise ValueError(message)


def prune(ckpt: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints up to ``latest`` (and any abandoned partial one);
    0 keeps everything. Returns the deleted tags."""
    latest = (ckpt / LATEST).read_text(encoding="utf-8").strip()
    if keep == 0:
        return []
    tags = sorted(d.name for d in ckpt.iterdir() if d.is_dir() and _TAG.fullmatch(d.name))
    complete = [t for t in tags if t <= latest and (ckpt / t / STATE).is_file()]
    kept = set(complete[-keep:]) | {latest}
    deleted = [t for t in tags if t not in kept]
    for tag in deleted:
        shutil.rmtree(ckpt / tag, ignore_errors=True)
    return deleted


def load(engine: Any, stream: SequenceStream, out_dir: str | Path) -> int:
    """Restore the latest checkpoint into ``engine`` and ``stream`` and this rank's RNGs; returns its step.

    On the world size that saved it, everything is restored exactly. On another (:func:`_load_moved`), the
    model, optimizer and schedule still are (ZeRO 1-3 partitions cut again by :mod:`pretrain.reshard`); the
    stream goes on with the rest of its epoch dealt to the new ranks (:meth:`SequenceStream.load_state_dict` with
    ``regroup``); rank r takes saved rank r's RNG states, a rank beyond them states seeded from (engine.seed, step,
    rank). The global batch (per-rank batch x accumulation x ranks) changes with the world size."""
    ckpt, tag, rank = checkpoint_dir(out_dir), latest_tag(out_dir), distributed.rank()
    if tag is None:
        raise ValueError(f"no checkpoint to resume from in {ckpt}")
    folder = ckpt / tag
    state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    world = distributed.world_size()
    if state["world_size"] != world:
        return _load_moved(engine, stream, folder, state, world)
    mine = json.loads((folder / f"rank{rank:05d}.json").read_text(encoding="utf-8"))
    stream.load_state_dict(mine["stream"])
    secure_loads(engine)
    path, _ = engine.load_checkpoint(str(ckpt), tag=tag)
    if path is None:
        raise ValueError(f"DeepSpeed found no checkpoint in {folder}")
    set_rng_state(safetensors.torch.load_file(str(folder / f"rank{rank:05d}.safetensors")), mine)
    return int(state["step"])


def _load_moved(engine: Any, stream: SequenceStream, folder: Path, state: dict[str, Any], world: int) -> int:
    """:func:`load` of a checkpoint saved by another number of ranks."""
    rank, saved, step = distributed.rank(), int(state["world_size"]), int(state["step"])
    if rank == 0:
        log.warning("%s was saved by %d ranks, resumed on %d: the model, optimizer and schedule are carried over, "
                    "the rest of the data stream's epoch is dealt to the new ranks (see the stream's message), and "
                    "the global batch changes with the rank count", folder, saved, world)  # fmt: skip
    first = json.loads((folder / "rank00000.json").read_text(encoding="utf-8"))
    stream.load_state_dict(first["stream"], regroup=True)  # every saved rank's position is the same
    secure_loads(engine)
    stage = engine.zero_optimization_stage()
    if stage == 0:  # whole states in one file (rank 0's), which DeepSpeed loads on any world size
        path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name)
        if path is None:
            raise ValueError(f"DeepSpeed found no checkpoint in {folder}")
    else:
        reshard.write(engine, *reshard.read(folder, saved, stage, safe_torch_load))
    if rank < saved:
        mine = json.loads((folder / f"rank{rank:05d}.json").read_text(encoding="utf-8"))
        set_rng_state(safetensors.torch.load_file(str(folder / f"rank{rank:05d}.safetensors")), mine)
    else:
        seed = int.from_bytes(hashlib.sha256(f"momrec-rng:{state['config']['engine']['seed']}:{step}:{rank}".encode())
                              .digest()[:8], "little")  # fmt: skip
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
    return step
