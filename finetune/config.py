"""Finetuning's config: the ``[finetune]`` section, and the root that adds it to pretraining's config.

A finetuning run is configured by :class:`FinetuneTrainConfig`, pretraining's :class:`~pretrain.config.TrainConfig`
plus ``finetune``; pretraining reads past a ``[finetune]`` table (``TrainConfig.FOREIGN``), so a preset or a saved
config.json serves both stages. Finetuning's saved configs (config.json, checkpoints, finetuned.json) load with
:func:`from_dict` here; pretraining's load here too (their finetune section, if any, as saved or the defaults).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pretrain import confighelp, configlib
from pretrain.config import TrainConfig
from pretrain.configlib import Section, at_least, check, fraction

__all__ = [
    "FinetuneConfig",
    "FinetuneMode",
    "FinetuneTrainConfig",
    "check_source",
    "config_help",
    "from_dict",
    "load_config",
]

FinetuneMode = Literal["full", "lora", "adapter", "frozen", "top"]


@dataclass
class FinetuneConfig(Section):
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

    def validate(self) -> None:
        check(all(self.fresh), "finetune.fresh", "holds an empty prefix")
        at_least(self, 1, "top_layers", "lora_rank")
        at_least(self, 0, "lora_top_layers")
        fraction(self, "lora_dropout")
        check(self.lora_alpha > 0, "finetune.lora_alpha", f"must be > 0, got {self.lora_alpha!r}")
        for name in ("lora_text_targets", "lora_image_targets", "lora_user_targets"):
            check(all(getattr(self, name) or []), f"finetune.{name}", "holds an empty module name")


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """A finetuning run (python -m finetune): the pretraining run's tree plus its finetune section."""

    FOREIGN: ClassVar[tuple[str, ...]] = ()

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Transfer to a target domain (python -m finetune)."""

    def validate(self) -> None:
        """Finetune's rules across sections, then pretraining's."""
        check(
            not (self.finetune.id_embeddings is False and self.loss.content_id),
            "loss.content_id",
            f"({self.loss.content_id}, from the pretrained run or your config) needs item-ID embeddings, which "
            "finetune.id_embeddings=false drops: set loss.content_id=0, or finetune.id_embeddings=true",
        )
        super().validate()

    def check_ready(self) -> None:
        """What finetuning needs beyond the schema: a source and target domains."""
        check_source(self.finetune.from_path)
        check(bool(self.data.domains), "data.domains", "is empty: name the target domain folders with --data")


def check_source(from_path: str) -> None:
    """finetune.from_path is set (a pretrained export, or 'none')."""
    check(bool(from_path), "finetune.from_path", "is not set: pass --from PRETRAINED_EXPORT (a pretraining run's "
          "model/ folder) or --from none (no pretraining)")  # fmt: skip


def load_config(
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
    implied: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
) -> FinetuneTrainConfig:
    """A finetuning config: defaults < ``base`` < files < overrides < ``implied``
    (:func:`pretrain.configlib.load_config`)."""
    return configlib.load_config(FinetuneTrainConfig, paths, overrides, base, implied)


def from_dict(data: Mapping[str, Any]) -> FinetuneTrainConfig:
    """A finetuning config from a (possibly partial) table such as :func:`pretrain.configlib.to_dict` gives."""
    return configlib.from_dict(FinetuneTrainConfig, data)


def config_help() -> str:
    """Every dotted key of a finetuning config (``python -m finetune --help-config``)."""
    return confighelp.config_help(FinetuneTrainConfig)
