"""The training engine: distributed setup, the DeepSpeed ZeRO engine around the Recommender, and the loop.

One code path for every setting: one CPU process without a launcher (RANK etc. defaulted here), several processes
of one machine or many nodes (the ``deepspeed`` launcher or ``torchrun`` set RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). On CPU, DeepSpeed's ``cpu`` accelerator with gloo; on GPUs, NCCL. A step is
``optim.grad_accum`` micro-batches on every rank; every rank yields the same number of batches per epoch
(:class:`~shards.stream.SequenceStream`), so no rank waits in a collective the others never reach.

Rank discipline: only rank 0 prints and writes (TensorBoard in ``run.out_dir/tb``, ``metrics.jsonl``, the resolved
``config.json``); every rank takes part in collectives, checkpoint saves and the export.

Finetuning reuses this engine: :func:`train` takes the model to train from a ``model_factory`` (finetune's loads
the pretrained weights and applies its mode) and writes ``model/`` and ``best/`` with an ``exporter`` (finetune's
saves the trained tensors only). ``run.keep_best`` keeps the model of the best ``valid/ndcg@10`` in ``best/``;
``run.early_stop_patience`` stops a run whose validation stopped improving.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import resource
import socket
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from shards.collate import Batch
from shards.inspect import check_sizes
from shards.stream import STATS, SequenceStream

from . import checkpoint, lock, validate
from .config import OptimConfig, TrainConfig, deepspeed_config, save_config, to_dict
from .encoders import Backbone
from .model import Catalog

log = logging.getLogger(__name__)

BEST_METRIC = "valid/ndcg@10"
"""The validation metric of run.keep_best and run.early_stop_patience (higher is better)."""
COUNT_KEYS = ("sequences", "positions", "items")
"""Keys of ModelOutput.logs that are batch counts, not losses."""
STREAM_STATS = STATS
"""The stream's counters, summed over ranks: ``data/*`` in TensorBoard and in the end-of-run summary."""


# ---- distributed setup ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
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


def init_distributed(timeout_s: float) -> Dist:
    """Join (or, without a launcher, create) the process group: gloo on CPU, NCCL on GPUs. A process group that
    already exists (an earlier :func:`train` in this process) is reused as it is, until :func:`shutdown`
    (``python -m pretrain`` calls it at exit)."""
    if "RANK" not in os.environ:  # one process, no launcher: DeepSpeed would otherwise look for MPI
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed = import_deepspeed()
    cuda = torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # every device's generator too


class GatherNegatives:
    """``loss.gather_negatives``: every rank's item table, padded to the largest (the model's ``Gather``).

    Tables differ in size across ranks and all_gather needs equal shapes, so each is padded to the largest U:
    integer tensors (item ids) with -1, which the loss masks; floating ones with 0. Gradients flow back to the
    local rows (``torch.distributed.nn.functional.all_gather``)."""

    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank, self.device = rank, device

    def _largest(self, rows: int) -> int:
        size = torch.tensor([rows], device=self.device)
        torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MAX)
        return int(size)

    def offset(self, rows: int) -> int:
        return self.rank * self._largest(rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_gather

        pad = self._largest(x.shape[0]) - x.shape[0]
        if pad:
            fill = 0 if x.is_floating_point() else -1
            x = torch.cat([x, x.new_full((pad, *x.shape[1:]), fill)])
        return torch.cat(all_gather(x))


# ---- optimizer and schedule -------------------------------------------------------------------------


def _no_decay(name: str, param: nn.Parameter, embedding_ids: set[int]) -> bool:
    """Biases, norm weights (1-d) and embedding tables (ID, position, token) are not decayed."""
    return param.ndim <= 1 or id(param) in embedding_ids or "embedding" in name.rsplit(".", 1)[-1]


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: (encoder_lr for the HF backbones' own weights | lr) x (decay | no
    decay). LoRA weights inside a backbone (finetune) are new parameters, not pretrained ones: they get lr."""
    encoder_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, Backbone)
        for n, p in m.named_parameters()
        if ".lora_" not in f".{n}"
    }
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = optim.encoder_lr if optim.encoder_lr is not None and id(param) in encoder_ids else optim.lr
        decay = 0.0 if _no_decay(name, param, embedding_ids) else optim.weight_decay
        groups.setdefault((lr, decay), []).append(param)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


FUSED_DEVICES = ("cpu", "cuda")
"""Device types with torch's fused AdamW kernel (floating-point tensors; CPU since torch 2.4)."""
FOREACH_DEVICES = ("cuda",)
"""Device types with native foreach kernels (elsewhere torch runs foreach ops one tensor at a time)."""


def adamw(groups: list[dict[str, Any]], optim: OptimConfig) -> torch.optim.AdamW:
    """torch's AdamW over ``groups`` (:func:`param_groups`) with optim's rates, betas, eps and implementation.
    Under ZeRO, DeepSpeed later points the groups at its fp32 partitions (same device type) and steps those."""
    params = [p for g in groups for p in g["params"]]
    devices = {p.device.type for p in params}
    floats = all(p.is_floating_point() for p in params)
    implementation = optim.implementation
    if implementation == "auto":
        fused = floats and devices <= set(FUSED_DEVICES)
        implementation = "fused" if fused else "foreach" if devices <= set(FOREACH_DEVICES) else "single"
    elif implementation == "fused" and not (floats and devices <= set(FUSED_DEVICES)):
        raise ValueError(f"optim.implementation='fused' needs floating-point parameters on {FUSED_DEVICES}, got "
                         f"{sorted(devices)}: use 'auto'")  # fmt: skip
    kind = {"fused": True} if implementation == "fused" else {"foreach": implementation == "foreach"}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, **kind)


def lr_factor(step: int, *, warmup: int, max_steps: int, cosine: bool, min_ratio: float) -> float:
    """LambdaLR factor of optimizer step ``step``: linear warm-up to 1, then cosine to min_ratio (or constant)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if not cosine:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine (or constant). A partial, not a callable object: LambdaLR saves an object's ``__dict__``
    and restores it on load, so a resumed run would keep the old max_steps; the step count is what is restored."""
    factor = functools.partial(
        lr_factor,
        warmup=optim.warmup_steps,
        max_steps=optim.max_steps,
        cosine=optim.schedule == "cosine",
        min_ratio=optim.min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- the run ----------------------------------------------------------------------------------------

ModelFactory = Callable[[TrainConfig, Catalog], nn.Module]
"""Builds the model to train from the resolved config and the catalog of the run's domains (called on every rank
with the same seed, before DeepSpeed wraps the model; only parameters with requires_grad are optimized)."""
Exporter = Callable[[Any, TrainConfig, Catalog, Path], Path]
"""Writes the engine's model into a folder: ``(engine, cfg, catalog, folder) -> folder``; every rank calls it."""


new_recommender: ModelFactory = validate.new_model
"""The default :data:`ModelFactory`: a freshly initialised Recommender (pretraining)."""


@dataclass
class Best:
    """The best validation so far (run.keep_best, run.early_stop_patience)."""

    score: float = -math.inf
    step: int = 0
    stale: int = 0
    """Validations since the best one that did not improve on it."""

    def update(self, score: float, step: int) -> bool:
        """Count the validation of ``step``; True when it is a new best (a NaN score never is)."""
        if score > self.score:
            self.score, self.step, self.stale = score, step, 0
            return True
        self.stale += 1
        return False


class Meter:
    """Sums of the model's logs over the micro-batches since the last log, on this rank, and the training time they
    took: the wall time since the last log less what validations and checkpoints took (:meth:`exclude`), so the
    throughput after a validation is the training's."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.sums: Counter = Counter()
        self.micro_batches = 0
        self.start = time.perf_counter()
        self.excluded = 0.0

    def add(self, logs: dict[str, float]) -> None:
        self.sums.update(logs)
        self.micro_batches += 1

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` of other work (a validation, a checkpoint) out of the training time."""
        self.excluded += seconds

    def elapsed(self) -> float:
        """Training seconds since the last log (never 0)."""
        return max(time.perf_counter() - self.start - self.excluded, 1e-9)


@dataclass
class Run:
    """Everything the loop touches."""

    cfg: TrainConfig
    dist: Dist
    engine: Any  # deepspeed.DeepSpeedEngine
    stream: SequenceStream
    catalog: Catalog
    folders: list[str]
    gather: GatherNegatives | None
    export: Exporter = checkpoint.export
    model_factory: ModelFactory = new_recommender
    """What built the model: also builds the full evaluation copy under ZeRO-3 (validate.evaluation_model)."""
    writer: Any = None  # SummaryWriter on rank 0
    step: int = 0
    meter: Meter = field(default_factory=Meter)
    grad_norm: float | None = None
    best: Best = field(default_factory=Best)
    stopped: bool = False
    """Early stopping ended the run before optim.max_steps."""
    first_step: int = 0
    """The step this process started from (a resumed run's checkpoint step)."""
    train_s: float = 0.0
    """Seconds spent in training steps (data, forward, backward, optimizer) in this process; validation,
    checkpoints and exports not included."""

    @property
    def tracks_best(self) -> bool:
        return self.cfg.run.keep_best or self.cfg.run.early_stop_patience > 0

    @property
    def own_grad_norm(self) -> bool:
        """DeepSpeed records the gradient norm except at stage 0 in fp32 (it clips without keeping the norm)."""
        return self.cfg.engine.zero_stage == 0 and self.cfg.engine.precision == "fp32"

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.run.out_dir)


def norm_buffers_to_bf16(model: nn.Module) -> None:
    """Batch-norm running statistics in bf16, like the weights: DeepSpeed casts parameters only and keeps buffers
    in fp32, and a CPU batch norm refuses bf16 weights with fp32 statistics. The model's own fp32 buffers
    (popularity, interest prototypes) stay fp32."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.data = module.running_mean.data.to(torch.bfloat16)
            module.running_var.data = module.running_var.data.to(torch.bfloat16)


def build(
    cfg: TrainConfig,
    dist: Dist,
    model_factory: ModelFactory = new_recommender,
    exporter: Exporter = checkpoint.export,
) -> Run:
    """Stream, catalog, model (from ``model_factory``), optimizer, schedule and DeepSpeed engine (same seed on
    every rank)."""
    deepspeed = import_deepspeed()
    seed_everything(cfg.engine.seed)
    folders = validate.catalog_folders(cfg)
    for folder in folders:  # a damaged catalog stops the run now, not at its first validation (after the training)
        check_sizes(folder, ("items",))  # (a damaged seqs shard is the stream's: counted, and the run goes on)
    stream = SequenceStream(cfg.data.domains, cfg.data.stream)
    catalog = Catalog.from_folders(folders)
    model = model_factory(cfg, catalog)
    for domain, folder in enumerate(folders):  # the stream and the validations read each domain's items from here
        model.bind_items(domain, folder, cfg.data.stream)
    if cfg.engine.precision == "bf16":
        norm_buffers_to_bf16(model)
    seed_everything(cfg.engine.seed + dist.rank)  # dropout and sampled negatives differ across ranks
    o = cfg.optim
    optimizer = adamw(param_groups(model, o), o)
    scheduler = lr_schedule(optimizer, o)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, dist.world_size),
        dist_init_required=False,
    )
    gather = GatherNegatives(dist.rank, dist.device) if cfg.loss.gather_negatives and dist.world_size > 1 else None
    return Run(cfg, dist, engine, stream, catalog, folders, gather, export=exporter, model_factory=model_factory)


def _open_writer(run: Run, resumed: bool) -> None:
    if run.dist.rank != 0:
        return
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops events a crashed run logged after the checkpoint it is resumed from
    run.writer = SummaryWriter(str(run.out_dir / "tb"), purge_step=run.step + 1 if resumed else None)
    run.writer.add_text("config", "```\n" + json.dumps(to_dict(run.cfg), indent=2) + "\n```", run.step)


def train(
    cfg: TrainConfig, model_factory: ModelFactory = new_recommender, exporter: Exporter = checkpoint.export
) -> dict[str, float]:
    """Train as ``cfg`` says, the model built by ``model_factory`` and written to ``run.out_dir/model`` (and
    ``best``) by ``exporter``. Returns the last logged metrics and the run's ``run/*`` summary (:func:`summary`).

    Rank 0 holds ``run.out_dir``'s lock (:mod:`pretrain.lock`) from before anything is written to the end, so a
    second run into the same folder is refused; a resumed run must keep the checkpoint's meaning
    (:func:`pretrain.checkpoint.check_resume`)."""
    dist = init_distributed(cfg.engine.process_group_timeout_s)
    with lock.rank0_lock(cfg.run.out_dir, force=cfg.run.force_unlock, what="run.out_dir"):
        return _train(cfg, dist, model_factory, exporter)


def _check_resume(cfg: TrainConfig, dist: Dist) -> bool:
    """Whether this run resumes a checkpoint (refusing one whose meaning the config changes); rank 0 logs the
    changes it allows."""
    if not cfg.run.resume or checkpoint.latest_tag(cfg.run.out_dir) is None:
        return False
    changes = checkpoint.check_resume(cfg)
    changes = {k: v for k, v in changes.items() if k not in ("run.resume", "run.force_unlock")}
    if changes and dist.rank == 0:
        log.info("resuming with changed settings: %s", checkpoint.describe_changes(changes))
    return True


def _train(cfg: TrainConfig, dist: Dist, model_factory: ModelFactory, exporter: Exporter) -> dict[str, float]:
    checkpoint.check_out_dir(cfg)
    resumed = _check_resume(cfg, dist)
    try:
        run = build(cfg, dist, model_factory, exporter)
        if resumed:
            run.step = run.first_step = checkpoint.load(run.engine, run.stream, run.out_dir)
            log.info("resumed from step %d (epoch %d, batch %d)", run.step, run.stream.epoch, run.stream.batches_done)
            restore_best(run)
        if dist.rank == 0:
            save_config(cfg, run.out_dir / "config.json")
        _open_writer(run, resumed)
        try:
            last = loop(run)
            run.engine.module.flush_feature_cache()  # the frozen-bottom outputs computed since the last validation
            _report_data(run, last)
            run.export(run.engine, cfg, run.catalog, run.out_dir / "model")
        finally:
            if run.writer is not None:
                run.writer.close()
        result = {**last, **summary(run)}
        # on success only: a rank that failed leaves at once (no barrier that would wait out the process-group
        # timeout while its peers wait in their next collective), and the peers' collectives fail when it is gone
        torch.distributed.barrier()
        return result
    except RuntimeError as e:
        if isinstance(e, torch.distributed.DistError) or any(b in str(e) for b in ("gloo", "NCCL", "Gloo")):
            raise CollectiveError(f"rank {dist.rank}: a collective failed: another rank died or stopped responding "
                                  f"(engine.process_group_timeout_s={cfg.engine.process_group_timeout_s:g}); see "
                                  f"the logs of the other ranks. {str(e).strip().splitlines()[0]}") from e  # fmt: skip
        raise


class CollectiveError(RuntimeError):
    """A rank died or hung: this one's collective failed, or waited past the process-group timeout."""


def _report_data(run: Run, last: dict[str, float]) -> None:
    """Rank 0, at the end: what the stream skipped since this process started (all ranks; the last log's sums)."""
    counts = {k: int(last.get(f"data/{k}", 0)) for k in STREAM_STATS}
    if run.dist.rank == 0:
        level = logging.WARNING if any(counts.values()) else logging.INFO
        log.log(level, "data skipped or repaired in this run (all ranks): %s",
                ", ".join(f"{k} {v}" for k, v in counts.items()))  # fmt: skip


def summary(run: Run) -> dict[str, float]:
    """``run/step`` (optimizer steps done), ``run/train_s`` (:attr:`Run.train_s`) and ``run/timed_steps`` (the steps
    it timed: those of this process), ``run/batches_per_epoch`` (this rank's micro-batches per epoch),
    ``run/early_stopped`` (1.0 or 0.0) and, when the best is tracked, ``run/best_step`` and ``run/best_score`` (its
    valid/ndcg@10)."""
    out = {
        "run/step": float(run.step),
        "run/train_s": run.train_s,
        "run/timed_steps": float(run.step - run.first_step),
        "run/batches_per_epoch": float(len(run.stream)),
        "run/early_stopped": float(run.stopped),
    }
    if run.tracks_best and run.best.score > -math.inf:  # best_step 0: the start was never beaten
        out.update({"run/best_step": float(run.best.step), "run/best_score": run.best.score})
    return out


def restore_best(run: Run) -> None:
    """After a resume: the best validation and the validations since it, from metrics.jsonl up to the resumed
    step (rows that a crashed run logged after its checkpoint are ignored; a step logged twice counts once)."""
    path = run.out_dir / "metrics.jsonl"
    if not run.tracks_best or not path.is_file():
        return
    scores: dict[int, float] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if BEST_METRIC in row and row["step"] <= run.step:
            scores[row["step"]] = row[BEST_METRIC]
    for step in sorted(scores):
        run.best.update(scores[step], step)
    patience = run.cfg.run.early_stop_patience
    run.stopped = patience > 0 and run.best.stale >= patience


def shutdown() -> None:
    """Leave the process group, through DeepSpeed so that it drops its handles too (a later :func:`train` in this
    process then starts a new one)."""
    if torch.distributed.is_initialized():
        import_deepspeed().comm.destroy_process_group()


# ---- the loop ---------------------------------------------------------------------------------------


def _epoch_batches(run: Run) -> Iterator[Batch]:
    """The rest of the current epoch's batches, then the next epochs', without end."""
    while True:
        stream = run.stream
        if len(stream) == 0:
            raise ValueError(
                f"epoch {stream.epoch} has no batch: fewer sequences than data.stream.batch_size x ranks x workers"
            )
        if stream.starts_epoch and run.cfg.model.user.interest_tokens:  # not at a regrouped rest (checkpoint.load)
            with torch.random.fork_rng(devices=_devices(run)):
                train_folders = run.folders[: len(run.cfg.data.domains)]
                validate.refresh_interests(run.engine, run.cfg, train_folders, run.dist, run.model_factory)
        batches = iter(stream)
        # the DataLoader draws its workers' base seed from the global RNG: keep that draw out of the training
        # RNG, so a resumed run (which starts its iterator at another point) makes the same random choices
        with torch.random.fork_rng(devices=[]):
            first = next(batches, None)
        if first is not None:
            yield first
            yield from batches
        stream.set_epoch(stream.epoch + 1)


def _devices(run: Run) -> list[int]:
    return [run.dist.device.index or 0] if run.dist.device.type == "cuda" else []


def loop(run: Run) -> dict[str, float]:
    cfg, engine = run.cfg, run.engine
    max_steps, last = cfg.optim.max_steps, {}
    bar_off = run.dist.rank != 0 or not sys.stderr.isatty()
    bar = tqdm(total=max_steps, initial=run.step, unit="step", desc="pretrain", disable=bar_off, dynamic_ncols=True)
    if run.step == 0 and cfg.run.eval_at_start and _validates(cfg):
        last = _validate(run)
    if run.step == 0 and cfg.run.keep_start:
        run.export(engine, cfg, run.catalog, run.out_dir / "start")
    engine.train()
    run.meter.restart()
    with bar, contextlib.closing(_epoch_batches(run)) as batches:
        while run.step < max_steps and not run.stopped:
            start = time.perf_counter()
            batch = next(batches).to(run.dist.device)
            out = engine(batch, run.gather)
            engine.backward(out.loss)
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary and run.own_grad_norm:
                run.grad_norm = _grad_norm(engine.module)
            engine.step()
            run.train_s += time.perf_counter() - start
            run.meter.add(out.logs)
            if not boundary:
                continue
            run.step += 1
            bar.update(1)
            last = _after_step(run, bar) or last
    return last


def _grad_norm(module: nn.Module) -> float:
    """Global 2-norm of the (already all-reduced) gradients, before clipping."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _due(step: int, every: int, max_steps: int) -> bool:
    return step == max_steps or (every > 0 and step % every == 0)


def _after_step(run: Run, bar: tqdm) -> dict[str, float] | None:
    cfg, step = run.cfg, run.step
    logged = None
    if _due(step, cfg.run.log_every, cfg.optim.max_steps):
        logged = _log_train(run)
        if run.dist.rank == 0:
            bar.set_postfix(loss=f"{logged['loss/total']:.4f}", refresh=False)
            if bar.disable:
                log.info("step %d/%d: %s", step, cfg.optim.max_steps, _brief(logged))
    start = time.perf_counter()
    if _due(step, cfg.run.eval_every, cfg.optim.max_steps) and _validates(cfg):
        logged = {**(logged or {}), **_validate(run)}
    if _due(step, cfg.run.save_every, cfg.optim.max_steps) or run.stopped:
        checkpoint.save(run.engine, cfg, run.stream, step, run.out_dir)
    run.meter.exclude(time.perf_counter() - start)  # not training: left out of the next log's throughput
    return logged


def _validates(cfg: TrainConfig) -> bool:
    return cfg.data.valid_domains is None or bool(cfg.data.valid_domains)


def _validate(run: Run) -> dict[str, float]:
    """The quick validation of the model as it is at ``run.step``: written, logged, and tracked as a best."""
    with torch.random.fork_rng(devices=_devices(run)):  # validation must not shift the training RNG
        metrics = validate.quick_validation(run.engine, run.cfg, run.folders, run.dist, run.model_factory)
    _write(run, metrics)
    if run.dist.rank == 0:
        log.info("step %d validation: %s", run.step, _brief(metrics))
    _track_best(run, metrics)
    return metrics


def _track_best(run: Run, metrics: dict[str, float]) -> None:
    """Export a new best to ``out_dir/best``; stop after run.early_stop_patience validations without one. The
    metrics are all-reduced, so every rank takes the same decision (and joins the export)."""
    if not run.tracks_best:
        return
    if run.best.update(metrics[BEST_METRIC], run.step):
        run.export(run.engine, run.cfg, run.catalog, run.out_dir / "best")
    patience = run.cfg.run.early_stop_patience
    if patience and run.best.stale >= patience:
        run.stopped = True
        if run.dist.rank == 0:
            log.info("early stop at step %d: %s has not improved on step %d's %.4g for %d validations",
                     run.step, BEST_METRIC, run.best.step, run.best.score, run.best.stale)  # fmt: skip


def _brief(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith(("loss/", "valid/", "perf/seq")))


# ---- metrics ------------------------------------------------------------------------------------------


def _rss_gb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in GB."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return current / 1e9, peak / 1e9


def _reduce(values: list[float], device: torch.device, op: Any) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=op)
    return t.tolist()


def _log_train(run: Run) -> dict[str, float]:
    """Losses averaged over micro-batches and ranks, throughput, memory and stream events: to TensorBoard."""
    meter, engine = run.meter, run.engine
    loss_keys = sorted(k for k in meter.sums if k not in COUNT_KEYS)
    local = [meter.sums[k] for k in loss_keys] + [meter.sums[k] for k in COUNT_KEYS] + [meter.micro_batches]
    local += [run.stream.stats[k] for k in STREAM_STATS]
    summed = _reduce(local, run.dist.device, torch.distributed.ReduceOp.SUM)
    memory = list(_rss_gb())
    if run.dist.device.type == "cuda":
        memory.append(torch.cuda.max_memory_allocated(run.dist.device) / 1e9)
    memory = _reduce(memory, run.dist.device, torch.distributed.ReduceOp.MAX)
    elapsed = meter.elapsed()
    n = len(loss_keys)
    micro = summed[n + len(COUNT_KEYS)]
    counts = dict(zip(COUNT_KEYS, summed[n : n + len(COUNT_KEYS)]))
    metrics = {f"loss/{k}": v / micro for k, v in zip(loss_keys, summed[:n])}
    scheduler = engine.lr_scheduler
    factor = scheduler.get_last_lr()[0] / scheduler.base_lrs[0]
    metrics["train/lr"] = factor * run.cfg.optim.lr
    if run.cfg.optim.encoder_lr is not None:
        metrics["train/encoder_lr"] = factor * run.cfg.optim.encoder_lr
    grad_norm = run.grad_norm if run.own_grad_norm else engine.get_global_grad_norm()
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    metrics["perf/sequences_per_s"] = counts["sequences"] / elapsed
    metrics["perf/items_encoded_per_s"] = counts["items"] / elapsed
    metrics["perf/dedup_saved"] = 1 - counts["items"] / max(counts["positions"], 1)
    metrics["mem/rss_gb"], metrics["mem/peak_rss_gb"] = memory[0], memory[1]
    if len(memory) > 2:
        metrics["mem/cuda_max_allocated_gb"] = memory[2]
    stats = summed[n + len(COUNT_KEYS) + 1 :]
    metrics.update({f"data/{k}": v for k, v in zip(STREAM_STATS, stats)})
    metrics["train/epoch"] = float(run.stream.epoch)
    _write(run, metrics)
    meter.restart()
    return metrics


def _write(run: Run, metrics: dict[str, float]) -> None:
    """Rank 0: TensorBoard scalars and one JSON line (exact floats) in metrics.jsonl."""
    if run.dist.rank != 0:
        return
    for tag, value in metrics.items():
        run.writer.add_scalar(tag, value, run.step)
    run.writer.flush()
    with open(run.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": run.step, **metrics}) + "\n")
