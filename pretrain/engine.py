"""The training engine: build the DeepSpeed ZeRO engine around the model, train, and the loop with early stopping.

One code path for every setting: one CPU process without a launcher, several processes of one machine or many
nodes (the ``deepspeed`` launcher or ``torchrun``); the process group is :mod:`pretrain.distributed`'s, the
optimizer and schedule :mod:`pretrain.optim`'s, the metrics writer :mod:`pretrain.runlog`'s. A step is
``optim.grad_accum`` micro-batches on every rank; every rank yields the same number of batches per epoch
(:class:`~shards.stream.SequenceStream`), so no rank waits in a collective the others never reach.

Rank discipline: only rank 0 prints and writes (TensorBoard in ``run.out_dir/tb``, ``metrics.jsonl``, the resolved
``config.json``, the parameters per part in ``parameters.json``); every rank takes part in collectives,
checkpoint saves and the export.

Finetuning reuses this engine: :func:`train` takes the model to train from a ``model_factory`` (finetune's loads
the pretrained weights and applies its mode) and writes ``model/`` and ``best/`` with an ``exporter`` (finetune's
saves the trained tensors only). ``run.keep_best`` keeps the model of the best ``valid/ndcg@10`` in ``best/``;
``run.early_stop_patience`` stops a run whose validation stopped improving.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from shards.collate import Batch
from shards.inspect import check_sizes
from shards.stream import SequenceStream

from . import checkpoint, lock, validate
from .catalog import catalog_folders
from .config import TrainConfig, save_config, to_dict
from .distributed import Dist, GatherNegatives, collective_failures, import_deepspeed, init_distributed
from .ds_config import deepspeed_config
from .export import Exporter, ModelFactory, export, new_model
from .model import Catalog
from .optim import adamw, lr_schedule, param_groups
from .parts import Counts, log_counts, parameter_counts, save_counts
from .runlog import STREAM_STATS, Meter, RunLog, logged_values, window_metrics

log = logging.getLogger(__name__)

BEST_METRIC = "valid/ndcg@10"
"""The validation metric of run.keep_best and run.early_stop_patience (higher is better)."""

# ---- the run ----------------------------------------------------------------------------------------


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
    export: Exporter = export
    model_factory: ModelFactory = new_model
    """What built the model: also builds the full evaluation copy under ZeRO-3 (validate.evaluation_model)."""
    writer: RunLog | None = None
    """The run's metrics writer, on rank 0."""
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
    params: Counts = field(default_factory=dict)
    """Trainable and total parameters per part (:mod:`pretrain.parts`), counted before ZeRO-3 partitions them."""

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # every device's generator too


def norm_buffers_to_bf16(model: nn.Module) -> None:
    """Batch-norm running statistics in bf16, like the weights: DeepSpeed casts parameters only and keeps buffers
    in fp32, and a CPU batch norm refuses bf16 weights with fp32 statistics. The model's own fp32 buffers
    (popularity, interest prototypes) stay fp32."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.data = module.running_mean.data.to(torch.bfloat16)
            module.running_var.data = module.running_var.data.to(torch.bfloat16)


def build(cfg: TrainConfig, dist: Dist, model_factory: ModelFactory = new_model, exporter: Exporter = export) -> Run:
    """Stream, catalog, model (from ``model_factory``), optimizer, schedule and DeepSpeed engine (same seed on
    every rank)."""
    deepspeed = import_deepspeed()
    seed_everything(cfg.engine.seed)
    folders = catalog_folders(cfg)
    for folder in folders:  # a damaged catalog stops the run now, not at its first validation (after the training)
        check_sizes(folder, ("items",))  # (a damaged seqs shard is the stream's: counted, and the run goes on)
    stream = SequenceStream(cfg.data.domains, cfg.data.stream)
    catalog = Catalog.from_folders(folders)
    model = model_factory(cfg, catalog)
    for domain, folder in enumerate(folders):  # the stream and the validations read each domain's items from here
        model.bind_items(domain, folder, cfg.data.stream)
    if cfg.engine.precision == "bf16":
        norm_buffers_to_bf16(model)
    params = parameter_counts(model)  # before deepspeed.initialize: ZeRO-3 leaves numel() 0
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
    return Run(cfg, dist, engine, stream, catalog, folders, gather, export=exporter, model_factory=model_factory,
               params=params)  # fmt: skip


def _open_writer(run: Run, resumed: bool) -> None:
    """Rank 0: the run's :class:`~pretrain.runlog.RunLog`, with the resolved config as text."""
    if run.dist.rank != 0:
        return
    # purge_step drops events a crashed run logged after the checkpoint it is resumed from
    run.writer = RunLog(run.out_dir, purge_step=run.step + 1 if resumed else None)
    run.writer.text("config", "```\n" + json.dumps(to_dict(run.cfg), indent=2) + "\n```", run.step)


def train(cfg: TrainConfig, model_factory: ModelFactory = new_model, exporter: Exporter = export) -> dict[str, float]:
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
    with collective_failures(dist.rank, cfg.engine.process_group_timeout_s):
        run = build(cfg, dist, model_factory, exporter)
        if resumed:
            run.step = run.first_step = checkpoint.load(run.engine, run.stream, run.out_dir)
            log.info("resumed from step %d (epoch %d, batch %d)", run.step, run.stream.epoch, run.stream.batches_done)
            restore_best(run)
        if dist.rank == 0:
            save_config(cfg, run.out_dir / "config.json")
            save_counts(run.params, run.out_dir)
            if model_factory is new_model:  # finetune's factory logs the table with its mode (finetune.run)
                log_counts(log, run.params)
        _open_writer(run, resumed)
        try:
            last = loop(run)
            run.stream.close()  # its persistent workers, before the export
            run.engine.module.flush_feature_cache()  # the frozen-bottom outputs computed since the last validation
            _report_data(run, last)
            run.export(run.engine, cfg, run.catalog, run.out_dir / "model")
        finally:
            run.stream.close()
            if run.writer is not None:
                run.writer.close()
        result = {**last, **summary(run)}
        # on success only: a rank that failed leaves at once (no barrier that would wait out the process-group
        # timeout while its peers wait in their next collective), and the peers' collectives fail when it is gone
        torch.distributed.barrier()
        return result


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
    if not run.tracks_best:
        return
    scores = logged_values(run.out_dir, BEST_METRIC, up_to=run.step)
    for step in sorted(scores):
        run.best.update(scores[step], step)
    patience = run.cfg.run.early_stop_patience
    run.stopped = patience > 0 and run.best.stale >= patience


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
            with torch.random.fork_rng(devices=run.dist.rng_devices):
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
    with torch.random.fork_rng(devices=run.dist.rng_devices):  # validation must not shift the training RNG
        metrics = validate.quick_validation(run.engine, run.cfg, run.folders, run.dist, run.model_factory)
    if run.writer is not None:  # rank 0
        run.writer.write(metrics, run.step)
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


def _log_train(run: Run) -> dict[str, float]:
    """Losses averaged over micro-batches and ranks, rates, throughput, memory and stream events: written."""
    engine, o = run.engine, run.cfg.optim
    factor = engine.lr_scheduler.get_last_lr()[0] / engine.lr_scheduler.base_lrs[0]
    train = {"train/lr": factor * o.lr}
    if o.encoder_lr is not None:
        train["train/encoder_lr"] = factor * o.encoder_lr
    grad_norm = run.grad_norm if run.own_grad_norm else engine.get_global_grad_norm()
    if grad_norm is not None:
        train["train/grad_norm"] = float(grad_norm)
    metrics = window_metrics(run.meter, run.stream.stats, run.dist.device, train)
    metrics["train/epoch"] = float(run.stream.epoch)
    if run.writer is not None:  # rank 0
        run.writer.write(metrics, run.step)
    run.meter.restart()
    return metrics
