"""The configuration of a pretraining run: the schema's root, its data/optim/engine/run sections, the cross rules.

One tree of dataclasses is the single source of truth: defaults live in them (the sections below, and the model's
and the objective's in :mod:`pretrain.model_config`); presets are TOML files (``launch/configs/*.toml``, with
``[engine]`` fragments in ``launch/ds/``); command-line overrides use dotted names. Precedence: overrides > later
files > earlier files > defaults (:mod:`pretrain.configlib`). The docstring under every field is its ``--help`` text
(:func:`config_help`). Each value lives in one key: the stream's tokenizer and history window follow the model's
(:meth:`TrainConfig.derive`). The DeepSpeed config is derived from this one (:mod:`pretrain.ds_config`). The
resolved config is saved as JSON with every run and inside every checkpoint (:func:`save_config`, :func:`to_dict`),
so ``finetune`` rebuilds the exact architecture from it (:func:`from_dict`); finetune's own section extends this
root in :mod:`finetune.config`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from shards.stream_config import StreamConfig

from . import confighelp, configlib
from .configlib import Section, at_least, check, deep_merge, save_config, to_dict
from .model_config import (
    FusionConfig,
    ImageEncoderConfig,
    LossConfig,
    ModelConfig,
    TextEncoderConfig,
    UserEncoderConfig,
)

__all__ = [
    "DataConfig",
    "EngineConfig",
    "FusionConfig",
    "ImageEncoderConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TextEncoderConfig",
    "TrainConfig",
    "UserEncoderConfig",
    "config_help",
    "deep_merge",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
]

log = logging.getLogger(__name__)


DEEPSPEED_DERIVED = {
    "train_micro_batch_size_per_gpu": "data.stream.batch_size",
    "gradient_accumulation_steps": "optim.grad_accum",
    "train_batch_size": "data.stream.batch_size and optim.grad_accum (x world size)",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "engine.precision",
    "bfloat16": "engine.precision",
    "fp16": "engine.precision",
    "amp": "engine.precision",
    "torch_autocast": "engine.precision",
    "zero_optimization.stage": "engine.zero_stage",
    "zero_optimization.offload_optimizer.device": "engine.offload_optimizer",
    "optimizer": "optim.* (momrec passes its own torch AdamW)",
    "scheduler": "optim.schedule, optim.warmup_steps and optim.min_lr_ratio",
    "zero_allow_untested_optimizer": "nothing: momrec's torch AdamW client optimizer needs it true",
    "zero_force_ds_cpu_optimizer": "nothing: it is false exactly when engine.offload_optimizer is true",
}
"""DeepSpeed keys that momrec derives (:func:`pretrain.ds_config.deepspeed_config`) -> the field to set instead."""


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    """tree[a][b][c] for 'a.b.c', or None where a level is missing or not a table."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


@dataclass
class DataConfig(Section):
    """What the model is trained and validated on."""

    PATH: ClassVar[str] = "data"

    domains: list[str] = field(default_factory=list)
    """Built domain folders (written by ``python -m shards build``), pooled into one training stream. Required to
    train; may stay empty in a config that only documents or derives things."""
    valid_domains: list[str] | None = None
    """Folders whose valid split is evaluated during training; None: the training domains; []: no validation."""
    stream: StreamConfig = field(default_factory=StreamConfig)
    """How shards become batches (its batch_size is the per-rank micro-batch of DeepSpeed)."""

    def validate(self) -> None:
        for name in ("domains", "valid_domains"):
            folders = getattr(self, name) or []
            check(all(folders), f"data.{name}", f"holds an empty folder name: {folders!r}")
            twice = sorted({f for f in folders if folders.count(f) > 1})
            check(not twice, f"data.{name}", f"lists {twice} more than once (a domain would weigh double)")


@dataclass
class OptimConfig(Section):
    """AdamW (torch's, passed to DeepSpeed as the client optimizer) and its learning-rate schedule."""

    PATH: ClassVar[str] = "optim"

    lr: float = 1e-3
    """Peak learning rate (user encoder, projections, fusion, ID embeddings)."""
    encoder_lr: float | None = None
    """Peak learning rate of the trainable weights of pretrained item encoders; None: lr."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases, norms and embeddings)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Optimizer steps of linear warm-up from 0 to the peak rate. Made to fit the run (:func:`fit_warmup`): left
    unset, a tenth of max_steps where that is less than 100; set longer than max_steps, a tenth of max_steps (with a
    warning). The saved config holds the warm-up used."""
    max_steps: int = 10_000
    """Optimizer steps of the run (each takes optim.grad_accum micro-batches on every rank)."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """After warm-up: cosine decay to min_lr_ratio x peak at max_steps, or constant."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, as a fraction of the peak."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping); DeepSpeed's gradient_clipping."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step; DeepSpeed's gradient_accumulation_steps."""
    implementation: Literal["auto", "fused", "foreach", "single"] = "auto"
    """How torch's AdamW updates the tensors: 'fused' (one kernel per device and dtype; CPU and CUDA), 'foreach'
    (batched tensor ops), 'single' (a Python loop over the tensors, torch's reference); 'auto': fused where the
    parameters' device has the kernel, else foreach where it has those, else single. The same update up to float
    rounding. A resumed run steps as its checkpoint was saved (torch's load_state_dict restores the flags)."""

    def validate(self) -> None:
        check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr!r}")
        check(self.encoder_lr is None or self.encoder_lr > 0, "optim.encoder_lr", "must be > 0 (or none)")
        check(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps!r}")
        check(all(0 <= b < 1 for b in self.betas), "optim.betas", f"must be in [0, 1), got {self.betas!r}")
        at_least(self, 0, "weight_decay", "warmup_steps", "grad_clip")
        at_least(self, 1, "max_steps", "grad_accum")
        check(
            self.warmup_steps <= self.max_steps,
            "optim.warmup_steps",
            f"({self.warmup_steps}) must be <= optim.max_steps ({self.max_steps})",
        )
        check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio!r}")


@dataclass
class EngineConfig(Section):
    """The DeepSpeed engine: ZeRO stage, precision, offload, and DeepSpeed-only keys passed through."""

    PATH: ClassVar[str] = "engine"
    CHOICE_HINTS: ClassVar[dict[str, str]] = {
        "precision": "fp16 is not offered: DeepSpeed refuses it on CPU ('Type fp16 is not supported on your device'), "
        "and bf16 trains on every ZeRO stage without loss scaling"
    }

    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage: 0 plain data parallel; 1 shards optimizer state; 2 also gradients; 3 also parameters."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision: 'fp32', or 'bf16' (bfloat16 weights and activations, fp32 optimizer state)."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (ZeRO-Offload; needs zero_stage >= 1)."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """DeepSpeed-only keys, deep-merged last into the derived DeepSpeed config, e.g. in TOML
    [engine.deepspeed.zero_optimization] reduce_bucket_size = 5e7. Keys that momrec derives are refused, naming
    the field to set instead."""
    seed: int = 0
    """Seed of model initialisation and dropout (the data order has data.stream.seed)."""
    process_group_timeout_s: float = 1800.0
    """Seconds a collective waits for the other ranks before the job fails (short in tests: a hang fails fast)."""

    def validate(self) -> None:
        at_least(self, 0, "seed")
        check(self.process_group_timeout_s > 0, "engine.process_group_timeout_s", "must be > 0")
        check(
            not self.offload_optimizer or self.zero_stage >= 1,
            "engine.offload_optimizer",
            "needs engine.zero_stage >= 1 (ZeRO-Offload partitions the optimizer state it moves)",
        )
        self._check_passthrough()

    def _check_passthrough(self) -> None:
        """engine.deepspeed may only hold keys that momrec does not derive (:data:`DEEPSPEED_DERIVED`)."""
        extra = self.deepspeed
        for table in ("zero_optimization", "zero_optimization.offload_optimizer"):
            value = _lookup(extra, table)
            check(value is None or isinstance(value, dict), f"engine.deepspeed.{table}", "must be a table")
        for key, ours in DEEPSPEED_DERIVED.items():
            check(_lookup(extra, key) is None, f"engine.deepspeed.{key}", f"is derived by momrec: set {ours} instead")
        check(
            self.offload_optimizer or _lookup(extra, "zero_optimization.offload_optimizer") is None,
            "engine.deepspeed.zero_optimization.offload_optimizer",
            "tunes an offload that is off: set engine.offload_optimizer=true",
        )


@dataclass
class RunConfig(Section):
    """Where the run writes, how often it logs, validates and saves, and whether it resumes."""

    PATH: ClassVar[str] = "run"

    out_dir: str = "runs/pretrain"
    """Folder of the run: resolved config.json, TensorBoard events, checkpoints."""
    log_every: int = 10
    """Optimizer steps between logged training metrics."""
    eval_every: int = 500
    """Optimizer steps between quick validations on eval_users (0: only at the end)."""
    eval_at_start: bool = True
    """Also validate before the first step (step 0; not when resuming), so that the starting model (untrained, or
    the pretrained one a finetuning starts from) is a candidate for best/ and early stopping: a run whose training
    only hurts keeps its start, and the curves show where training began."""
    eval_users: int = 1000
    """Users sampled (fixed seed) from the valid split for the quick validation (0: all of them)."""
    save_every: int = 1000
    """Optimizer steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept (0: keep all)."""
    resume: bool = False
    """Continue from the latest checkpoint in out_dir (model, optimizer, schedule, data position); without it an
    out_dir that already holds checkpoints is refused."""
    force_unlock: bool = False
    """Take out_dir's lock even though another run holds it. A run holds out_dir/.lock from start to end, so a second
    run into the same folder is refused; the lock of a dead run on this host is taken over by itself, but one left by
    a run on another host cannot be checked from here: set this (--force-unlock) once you know that run is dead."""
    keep_best: bool = False
    """Export the model of the best valid/ndcg@10 so far to out_dir/best (same format as out_dir/model), at each
    validation that improves on it. Implied by early_stop_patience > 0. python -m finetune defaults it to true."""
    early_stop_patience: int = 0
    """Stop when this many validations in a row did not improve valid/ndcg@10 on the best so far (0: off); the
    best model is in out_dir/best."""
    keep_start: bool = False
    """Export the model as it starts (before the first step; not when resuming) to out_dir/start, in the format
    of out_dir/model: python -m finetune defaults it to true and tests it too, so that every finetuning reports
    the zero-shot score of its start (the pretrained model, or the untrained control) next to the trained one."""

    def validate(self) -> None:
        check(bool(self.out_dir), "run.out_dir", "must not be empty")
        at_least(self, 1, "log_every")
        at_least(self, 0, "eval_every", "eval_users", "save_every", "keep_checkpoints", "early_stop_patience")
        check(
            not self.early_stop_patience or self.eval_every > 0,
            "run.early_stop_patience",
            "needs run.eval_every > 0 (with validation only at the end there is nothing to stop)",
        )


@dataclass
class TrainConfig(Section):
    """A pretraining run (python -m finetune extends it with its section: finetune.config.FinetuneTrainConfig)."""

    PATH: ClassVar[str] = ""
    FOREIGN: ClassVar[tuple[str, ...]] = ("finetune",)
    """Finetune's section, which presets shared with finetuning and configs saved before it moved to
    finetune/config.py may hold: pretraining reads past it."""
    NOTES: ClassVar[dict[str, str]] = {
        "data.stream.text_model": "In a momrec config it follows model.text.name_or_path: set that key instead.",
        "data.stream.max_seq_len": "In a momrec config it follows model.user.max_seq_len: set that key instead (or "
        "this one lower, for a shorter window than the position table).",
    }

    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation data."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The architecture (rebuilt by finetune from the saved config)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The objective."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """DeepSpeed."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output, logging, validation, checkpoints."""

    @classmethod
    def derive(cls, given: Mapping[str, Any], table: dict[str, Any]) -> None:
        """Each value in one key: the stream's tokenizer is the text encoder's (model.text.name_or_path) and its
        history window the position table's (model.user.max_seq_len), unless a layer set them (a saved config
        holds both; a window may be shorter; another tokenizer is refused by :meth:`validate`); the warm-up fits the
        run (:func:`fit_warmup`)."""
        fit_warmup(given, table)
        stream, given_stream = _lookup(table, "data.stream"), _lookup(given, "data.stream")
        if not isinstance(stream, dict):
            return  # not a table: building it says so
        given_stream = given_stream if isinstance(given_stream, Mapping) else {}
        follows = (("text_model", "model.text.name_or_path", str), ("max_seq_len", "model.user.max_seq_len", int))
        for key, model_key, kind in follows:
            value = _lookup(table, model_key)
            if key not in given_stream and type(value) is kind:  # a wrong type is the model key's error to report
                stream[key] = value

    def check_ready(self) -> None:
        """What training needs beyond the schema (a config without data may still be printed or explained)."""
        check(bool(self.data.domains), "data.domains", "is empty: name the built domain folders to train on (in a "
              "config file, or data.domains=path/a,path/b)")  # fmt: skip

    def validate(self) -> None:
        """Rules that span sections."""
        stream, model, loss = self.data.stream, self.model, self.loss
        check(
            model.user.max_seq_len >= stream.max_seq_len,
            "model.user.max_seq_len",
            f"({model.user.max_seq_len}) must be >= data.stream.max_seq_len ({stream.max_seq_len}): set "
            "model.user.max_seq_len, which data.stream.max_seq_len follows (set that only for a shorter window)",
        )
        check(
            not model.text.enabled or os.path.normpath(model.text.name_or_path) == os.path.normpath(stream.text_model),
            "model.text.name_or_path",
            f"({model.text.name_or_path!r}) is also the tokenizer, which data.stream.text_model "
            f"({stream.text_model!r}) follows: set model.text.name_or_path only",
        )
        check(
            stream.item_content or not (model.text.enabled or model.image.enabled),
            "data.stream.item_content",
            "is false, but the model has a text or image encoder to feed: set it true (false is for ID-only models)",
        )
        image = model.image
        check(
            not (image.enabled and image.cache_frozen and image.trainable != "all" and stream.augment),
            "model.image.cache_frozen",
            "(default true) cannot be combined with data.stream.augment: the frozen bottom's cached output would be "
            "that of the first view of an image, flipped or not; set model.image.cache_frozen=false",
        )
        check(
            not (loss.gather_negatives and model.fusion.kind == "score"),
            "loss.gather_negatives",
            "is not supported with model.fusion.kind='score' (score fusion scores per modality, and the gathered "
            "tables hold fused rows only): turn one of them off",
        )
        check(
            not (loss.queue_batches and model.fusion.kind == "score"),
            "loss.queue_batches",
            "is not supported with model.fusion.kind='score' (it scores per modality; the queue holds fused rows)",
        )
        check(not loss.content_id or model.user.id_embeddings, "loss.content_id", "needs model.user.id_embeddings")
        check(
            not loss.content_id or model.text.enabled or model.image.enabled,
            "loss.content_id",
            "needs a content encoder (model.text.enabled or model.image.enabled): an ID-only model has no content "
            "to align its IDs with",
        )
        check(
            not (self.run.keep_best or self.run.early_stop_patience) or self.data.valid_domains != [],
            "run.keep_best" if self.run.keep_best else "run.early_stop_patience",
            "needs validation: data.valid_domains is []",
        )
        check(
            not loss.interest_diversity or model.user.interest_tokens,
            "loss.interest_diversity",
            "needs model.user.interest_tokens > 0",
        )
        check(
            not loss.cpc or loss.cpc_prefix < stream.max_seq_len,
            "loss.cpc_prefix",
            f"({loss.cpc_prefix}) must be < data.stream.max_seq_len ({stream.max_seq_len}) to leave a suffix",
        )
        max_positions = model.text.config_overrides.get("max_position_embeddings", stream.max_text_len)
        check(
            not isinstance(max_positions, int) or max_positions >= stream.max_text_len,
            "model.text.config_overrides.max_position_embeddings",
            f"({max_positions}) must be >= data.stream.max_text_len ({stream.max_text_len})",
        )


WARMUP_SHARE = 10
"""A warm-up that does not fit the run becomes max_steps // WARMUP_SHARE optimizer steps (a tenth of the run)."""


def fit_warmup(given: Mapping[str, Any], table: dict[str, Any]) -> None:
    """Make optim.warmup_steps fit optim.max_steps in ``table``: the default (unset in ``given``) becomes a tenth of
    the run where that is shorter, and a warm-up set longer than the run is cut to a tenth of it, with a warning
    (rank 0; logged at load, before the run's logging is set up). A warm-up set within the run is kept."""
    optim = table.get("optim")
    warmup, steps = (optim.get("warmup_steps"), optim.get("max_steps")) if isinstance(optim, dict) else (None, None)
    if type(warmup) is not int or type(steps) is not int or steps < 1:
        return  # a wrong type or value is the schema's error to report
    share = steps // WARMUP_SHARE
    if _lookup(given, "optim.warmup_steps") is None:
        optim["warmup_steps"] = min(warmup, share)
    elif warmup > steps:
        optim["warmup_steps"] = share
        if os.environ.get("RANK", "0") == "0":
            log.warning("optim.warmup_steps (%d) is longer than the run, optim.max_steps (%d): warming up for %d "
                        "steps instead (a tenth of the run)", warmup, steps, share)  # fmt: skip


# ---- the schema's files and tables (pretrain.configlib with this root) -----------------------------------


def load_config(
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
    root: type[TrainConfig] = TrainConfig,
    implied: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
) -> TrainConfig:
    """Defaults < ``base`` < files < overrides < ``implied`` (see :func:`pretrain.configlib.load_config`)."""
    return configlib.load_config(root, paths, overrides, base, implied)


def from_dict(data: Mapping[str, Any], root: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """The config of a (possibly partial) table such as :func:`to_dict` gives; missing keys take defaults."""
    return configlib.from_dict(root, data)


def config_help(root: type = TrainConfig) -> str:
    """Every dotted config key with its type, default and docstring (``python -m pretrain --help-config``)."""
    return confighelp.config_help(root)
