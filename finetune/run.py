"""A finetuning run: the config resolved from the pretrained run's, the pretrain engine with finetune's model
factory and exporter, and a summary of what it cost.

Config precedence (later wins): defaults < ``run.out_dir=runs/finetune``, ``run.keep_best=true``,
``run.keep_start=true`` < the pretrained run's ``model``, ``data.stream`` and ``loss`` sections < ``--config`` files
< ``--from`` / ``--data`` / ``--mode`` < ``section.field=value`` overrides < what the mode implies
(:func:`finetune.modes.mode_overrides`). With ``--from none`` there is no pretrained layer: the architecture comes
from the files (the preset the pretraining used).

The run writes what pretraining writes (config.json, metrics.jsonl, tb/, checkpoints/), with ``model/`` and
``best/`` in finetune's format (:mod:`finetune.export`), and ``summary.json``: trainable parameters per part, the
weights transferred and skipped, steps, time per epoch, peak memory, the best validation, and the
full-ranking test metrics (pretrain.evaluate) of the best model and (``test_start``) of the start: the zero-shot
score of the pretrained model, or of the untrained control.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pretrain.cli import quiet_loggers
from pretrain.config import TrainConfig
from pretrain.configlib import deep_merge
from pretrain.distributed import init_distributed, rank
from pretrain.families import check_on_disk
from pretrain.lock import rank0_lock
from pretrain.model import Catalog, Recommender
from pretrain.parts import count_lines
from pretrain.runlog import RunLog, memory_gb
from shards.subset import catalog_id

from .config import check_source, load_config
from .export import load_finetuned, save_finetuned
from .modes import PARTS, mode_overrides
from .transfer import Prepared, Source, prepare_model, read_export_config

log = logging.getLogger(__name__)

NONE = "none"
"""``--from none``: the no-pretraining control."""
DEFAULTS = {"run": {"out_dir": "runs/finetune", "keep_best": True, "keep_start": True}}
"""Finetuning's own defaults, below everything else."""
SUMMARY = "summary.json"


def resolve_config(
    from_path: str | None = None,
    data: Sequence[str] | None = None,
    mode: str | None = None,
    config_files: Sequence[str | os.PathLike] = (),
    overrides: Sequence[str] = (),
) -> TrainConfig:
    """The finetuning config (see the module docstring for the order of the layers). ``from_path``, ``data`` and
    ``mode`` are the command line's --from, --data and --mode (None: as the files and overrides say)."""
    flags = []
    if from_path is not None:
        flags.append(f"finetune.from_path={from_path}")
    if data is not None:  # the target domains, validated on themselves
        flags += [f"data.domains={json.dumps(list(data))}", "data.valid_domains=none"]
    if mode is not None:
        flags.append(f"finetune.mode={mode}")
    cli = [*flags, *overrides]
    if from_path is None:  # set in a file or an override: a first pass finds it (the pretrained layer lies below)
        with quiet_loggers("pretrain.config"):  # its notes (a warm-up cut to the run) come once, from the pass below
            from_path = load_config(config_files, cli, base=DEFAULTS, implied=mode_overrides).finetune.from_path
    check_source(from_path)
    base = copy.deepcopy(DEFAULTS)
    if from_path != NONE:
        pretrained = read_export_config(from_path)["config"]
        deep_merge(base, {"model": pretrained["model"], "data": {"stream": pretrained["data"]["stream"]},
                      "loss": pretrained["loss"]})  # fmt: skip
    cfg = load_config(config_files, cli, base=base, implied=mode_overrides)
    if cfg.finetune.from_path != from_path:
        raise ValueError(f"--from {from_path} and finetune.from_path={cfg.finetune.from_path} disagree: give one")
    cfg.check_ready()
    check_on_disk(cfg.model.backbone_names())  # one line now, not a traceback after the start-up
    return cfg


# ---- the run ----------------------------------------------------------------------------------------------


class Finetune:
    """The hooks that finetuning hands to :func:`pretrain.engine.train`: the model factory (pretrained weights,
    target catalog, mode) and the exporter (trained tensors + pointer)."""

    def __init__(self, source: Source | None) -> None:
        self.source = source
        self.prepared: Prepared | None = None

    def model(self, cfg: TrainConfig, catalog: Catalog) -> Recommender:
        """The model to train; called again for the evaluation copies under ZeRO-3 (logged the first time only)."""
        model, prepared = prepare_model(cfg, catalog, self.source)
        if self.prepared is None:
            self.prepared = prepared
            if rank() == 0:
                _log_prepared(cfg, prepared)
        return model

    def export(self, engine: Any, cfg: TrainConfig, catalog: Catalog, folder: Path) -> Path:
        return save_finetuned(engine.module, cfg, catalog, self.source, folder, engine=engine)


def _log_prepared(cfg: TrainConfig, prepared: Prepared) -> None:
    origin = "no pretraining (--from none)" if prepared.source is None else prepared.source.path
    log.info("finetune mode %s from %s", cfg.finetune.mode, origin)
    if prepared.transfer is not None:
        t = prepared.transfer
        log.info("loaded %d pretrained tensors; not loaded (catalog-dependent or finetune.fresh) %s; fresh %s",
                 len(t.loaded), t.skipped, t.fresh)  # fmt: skip
    for line in count_lines(prepared.params):
        log.info(line)
    _log_optim(cfg, prepared)
    for part, layers in prepared.lora.items():
        if not layers:
            default = part == "image" and cfg.finetune.lora_image_targets is None
            why = f"{cfg.model.image.architecture}: no attention" if default else f"finetune.lora_{part}_targets=[]"
            log.info("  no LoRA on %s (%s)", part, why)
            continue
        log.info("  LoRA on %s: %d layers %s", part, len(layers), layers if len(layers) <= 8 else layers[:8] + ["..."])


def _log_optim(cfg: TrainConfig, prepared: Prepared) -> None:
    """The learning rates this run uses, beside the pretrained run's: optim is not inherited, and the encoders'
    rate decides much of a short finetuning (ML-100K, 30 steps: encoder_lr 1e-3 gave twice the NDCG@10 of 5e-5)."""
    o = cfg.optim
    line = f"optim: lr {o.lr:g}, encoder_lr {'= lr' if o.encoder_lr is None else f'{o.encoder_lr:g}'}"
    if prepared.source is not None:
        before = read_export_config(prepared.source.path)["config"].get("optim", {})
        enc = before.get("encoder_lr")
        line += (f" (from this run's config; the pretrained run used lr {before.get('lr')}, encoder_lr "
                 f"{'= lr' if enc is None else enc}: optim is not inherited)")  # fmt: skip
    log.info(line)


def finetune(cfg: TrainConfig) -> dict[str, Any]:
    """Finetune as ``cfg`` says (from :func:`resolve_config`) with the pretrain engine; returns the summary (also
    written to ``run.out_dir/summary.json``, TensorBoard and metrics.jsonl by rank 0). Rank 0 holds run.out_dir's lock
    (:mod:`pretrain.lock`) until the test results and the summary are written too."""
    init_distributed(cfg.engine.process_group_timeout_s)
    with rank0_lock(cfg.run.out_dir, force=cfg.run.force_unlock, what="run.out_dir"):
        return _finetune(cfg)


def _finetune(cfg: TrainConfig) -> dict[str, Any]:
    from pretrain.engine import train

    source = None if cfg.finetune.from_path == NONE else Source.open(cfg.finetune.from_path)
    job = Finetune(source)
    metrics = train(cfg, model_factory=job.model, exporter=job.export)
    assert job.prepared is not None
    summary = make_summary(cfg, job.prepared, metrics)
    out = Path(cfg.run.out_dir)
    summary["test"] = evaluate_best(out / "best", cfg)
    if (out / "start").is_dir():  # zero-shot: the model finetuning started from, before any step
        summary["test_start"] = evaluate_best(out / "start", cfg, tag="start-")
    if rank() == 0:
        _write_summary(cfg, summary)
    return summary


def evaluate_best(folder: Path, cfg: TrainConfig, tag: str = "") -> dict[str, float]:
    """Full-ranking test metrics (:func:`pretrain.ranking.evaluate_domain`) of the model in ``folder`` (the best
    one, or the last when no best was kept) on the test split of every validation domain (the target domains
    unless data.valid_domains names others, e.g. the whole domain of a user subset): ``test/full/...`` for one
    domain, ``test/<domain>/full/...`` per domain when there are several; each domain's result, with every user's
    rank, also goes to ``run.out_dir/eval-<tag><domain>.json`` (as ``python -m pretrain.evaluate`` writes it). Every
    rank must call it."""
    from pretrain.catalog import catalog_folders, valid_folders
    from pretrain.evaluate import result_document
    from pretrain.outputs import write_json
    from pretrain.ranking import EvalOptions, evaluate_domain

    if not folder.is_dir():
        folder = Path(cfg.run.out_dir) / "model"
    model, _, catalog = load_finetuned(folder)
    if torch.distributed.is_initialized() and torch.cuda.is_available():
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    opts = EvalOptions(splits=("test",), batch_size=cfg.data.stream.batch_size)
    metrics: dict[str, float] = {}
    position = {catalog_id(f): d for d, f in enumerate(catalog_folders(cfg))}
    folders = valid_folders(cfg) or list(cfg.data.domains)
    for data in folders:
        domain = position[catalog_id(data)]
        evaluated = evaluate_domain(model, data, domain, cfg.data.stream, opts)
        if rank() == 0:  # with each user's rank, for paired comparisons (python -m pretrain.paired)
            path = Path(cfg.run.out_dir) / f"eval-{tag}{evaluated.domain}.json"
            write_json(path, result_document(evaluated, folder, domain, True, opts))
        result = evaluated.metrics()
        if len(folders) == 1:
            metrics.update(result)
        else:
            metrics.update({f"test/{catalog.domains[domain]}/{k.removeprefix('test/')}": v for k, v in result.items()})
    if rank() == 0:
        brief = {k: round(v, 4) for k, v in metrics.items() if k.endswith(("ndcg@10", "hr@10")) and k.count("/") <= 3}
        log.info("test (%s): %s", folder, brief)
    return metrics


def _peak_memory_gb(metrics: dict[str, float]) -> dict[str, float | None]:
    own = memory_gb()
    cuda = metrics.get("mem/cuda_max_allocated_gb")
    if cuda is None:
        cuda = own.get("mem/cuda_max_allocated_gb")
    return {
        "peak_rss_gb": max(own["mem/peak_rss_gb"], metrics.get("mem/peak_rss_gb", 0.0)),
        "cuda_max_allocated_gb": cuda,
    }


def make_summary(cfg: TrainConfig, prepared: Prepared, metrics: dict[str, float]) -> dict[str, Any]:
    """What the run trained and what it cost, from the prepared model and the engine's returned metrics."""
    steps = int(metrics["run/step"])
    epoch_steps = max(metrics["run/batches_per_epoch"], 1.0) / cfg.optim.grad_accum
    timed_epochs = metrics["run/timed_steps"] / epoch_steps  # a resumed run times its own steps only
    best = None
    if "run/best_step" in metrics:
        best = {"step": int(metrics["run/best_step"]), "valid/ndcg@10": metrics["run/best_score"]}
    return {
        "mode": cfg.finetune.mode,
        "pretrained": None if prepared.source is None else prepared.source.pointer(),
        "params": prepared.params,
        "lora": prepared.lora,
        "transfer": None if prepared.transfer is None else prepared.transfer.to_dict(),
        "steps": steps,
        "early_stopped": bool(metrics["run/early_stopped"]),
        "best": best,
        "time": {
            "epochs": steps / epoch_steps,
            "train_s": metrics["run/train_s"],
            "s_per_epoch": metrics["run/train_s"] / timed_epochs if timed_epochs else None,
        },
        "memory": _peak_memory_gb(metrics),
        "test": None,
        "test_start": None,
    }


def summary_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's numbers as flat ``finetune/*`` scalars (TensorBoard, metrics.jsonl)."""
    params = summary["params"]
    out = {"finetune/trainable_params": float(params["all"]["trainable"]),
           "finetune/total_params": float(params["all"]["total"])}  # fmt: skip
    out.update({f"finetune/trainable_params/{p}": float(params[p]["trainable"]) for p in PARTS if p in params})
    if summary["time"]["s_per_epoch"] is not None:
        out["finetune/s_per_epoch"] = summary["time"]["s_per_epoch"]
    out.update({f"finetune/{k}": v for k, v in summary["memory"].items() if v is not None})
    if summary["best"] is not None:
        out["finetune/best_step"] = float(summary["best"]["step"])
    out.update(summary["test"] or {})
    out.update({f"start/{k}": v for k, v in (summary.get("test_start") or {}).items()})
    return out


def _write_summary(cfg: TrainConfig, summary: dict[str, Any]) -> None:
    out = Path(cfg.run.out_dir)
    (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    with RunLog(out) as runlog:  # the engine's writer closed: a second events file in tb/, rows appended
        runlog.write(summary_scalars(summary), summary["steps"])
        runlog.text("finetune/summary", "```\n" + json.dumps(summary, indent=1) + "\n```", summary["steps"])
    log.info("finetune summary: %s", out / SUMMARY)
