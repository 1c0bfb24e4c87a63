"""Finetuning modes: which parameters of a Recommender train, and Hugging Face PEFT LoRA on its attention.

=========  ===========================================================================================
mode       trains
=========  ===========================================================================================
full       every parameter
lora       LoRA on the text and image backbones' attention and the user encoder's q/k/v/o, plus pooling,
           projections and fusion; everything else frozen. ResNet and ConvNeXt have no attention: by
           default they get no LoRA and the image encoder trains its projection only.
adapter    pooling, projections and fusion only (MISSRec's adapters); backbones and user encoder frozen
frozen     pooling, projections, fusion and the user encoder; the item backbones frozen (UniSRec / MISSRec's
           frozen-text setting: each item's backbone output can be cached once)
top        the ``finetune.top_layers`` last blocks (+ final norm) of each item backbone (TransRec), and
           everything outside the backbones (pooling, projections, fusion, user encoder)
=========  ===========================================================================================

Item-ID embeddings for the target catalog (``finetune.id_embeddings``) are fresh and train in every mode. The item
backbones' part is set through the config (:func:`mode_overrides` writes ``model.text/image.trainable``), so the
saved config tells what trained; the user encoder and LoRA are set on the built model (:func:`apply_mode`).

The parts of a Recommender, by parameter name (:func:`part_of`): ``text.backbone``, ``text.head`` (pooling and
projection), ``image.backbone``, ``image.head`` (projection), ``fusion``, ``user``, ``ids``; they and their
parameter counts live in :mod:`pretrain.parts` (pretraining reports them too), re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from pretrain.backbone import Backbone
from pretrain.model import Recommender
from pretrain.parts import PARTS as PARTS
from pretrain.parts import parameter_counts as parameter_counts
from pretrain.parts import part_of as part_of

from .config import FinetuneConfig, FinetuneTrainConfig, from_dict

log = logging.getLogger(__name__)

BACKBONE_TRAINABLE = {"full": "all", "top": "top", "adapter": "none", "frozen": "none", "lora": "none"}
"""finetune.mode -> model.text.trainable and model.image.trainable."""

USER_TRAINS = ("full", "frozen", "top")
"""The modes in which the user encoder trains (whole)."""
USER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
"""LoRA targets of the user encoder: its attention's explicit projections (pretrain/user.py)."""
TEXT_TARGETS = ["query", "value"]
"""LoRA targets of BERT-like text backbones (BertSelfAttention.query / .value; MiniLM is a BertModel)."""
IMAGE_TARGETS = {"vit": ["q_proj", "v_proj"], "resnet": [], "convnext": []}
"""LoRA targets per image architecture: ViT's attention in transformers 5 (ViTAttention.q_proj / .v_proj; older
versions named them query / value); ResNet and ConvNeXt have no attention, hence no default LoRA."""


def mode_overrides(table: dict[str, Any]) -> dict[str, Any]:
    """The config layer that finetune.mode implies, from the merged config ``table`` (before it is checked, so that
    e.g. model.text.cache_frozen=true is judged with the mode's frozen backbone): the item backbones' trainable part
    (``top_layers`` with mode 'top'; no frozen-bottom cache with 'full', where nothing is frozen), and
    model.user.id_embeddings from finetune.id_embeddings when set."""
    ft = from_dict({"finetune": table.get("finetune", {})}).finetune
    encoder: dict[str, Any] = {"trainable": BACKBONE_TRAINABLE[ft.mode]}
    if ft.mode == "top":
        encoder["top_layers"] = ft.top_layers
    if ft.mode == "full":
        encoder["cache_frozen"] = False
    model: dict[str, Any] = {"text": dict(encoder), "image": dict(encoder)}
    if ft.id_embeddings is not None:
        model["user"] = {"id_embeddings": ft.id_embeddings}
    return {"model": model}


# ---- LoRA ---------------------------------------------------------------------------------------------------


def lora_targets(cfg: FinetuneTrainConfig) -> dict[str, list[str]]:
    """``{"text" | "image" | "user": module-name suffixes}`` for LoRA: finetune.lora_*_targets, or the defaults
    of each architecture; enabled encoders only."""
    ft, model = cfg.finetune, cfg.model
    targets: dict[str, list[str]] = {}
    if model.text.enabled:
        targets["text"] = list(TEXT_TARGETS if ft.lora_text_targets is None else ft.lora_text_targets)
    if model.image.enabled:
        default = IMAGE_TARGETS[model.image.architecture]
        targets["image"] = list(default if ft.lora_image_targets is None else ft.lora_image_targets)
    targets["user"] = list(USER_TARGETS if ft.lora_user_targets is None else ft.lora_user_targets)
    return targets


def _lora_host(model: Recommender, part: str) -> nn.Module:
    """The module LoRA is injected into: the Hugging Face backbone of an item encoder, or the user encoder."""
    return model.user if part == "user" else getattr(model, part).backbone.model


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # PEFT's rule for a list of target names


def _adaptable(host: nn.Module) -> list[str]:
    return [n for n, m in host.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))]


def _check_targets(host: nn.Module, part: str, targets: Sequence[str]) -> list[str]:
    """The layer names of ``host`` that ``targets`` select; a ValueError naming the config field when a target
    matches no layer (PEFT itself only complains when none of them does)."""
    layers = _adaptable(host)
    for target in targets:
        if not any(_matches(n, target) for n in layers):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
            raise ValueError(
                f"finetune.lora_{part}_targets: {target!r} matches no linear, conv or embedding layer of the {part} "
                f"{'encoder' if part == 'user' else 'backbone'} ({type(host).__name__}); its layer names end in "
                f"{leaves}"
            )
    return [n for n in layers if any(_matches(n, t) for t in targets)]


def _in_top_blocks(backbone: Backbone, names: list[str], k: int, part: str) -> list[str]:
    """The layers of ``names`` (relative to ``backbone.model``) that lie in its last ``k`` blocks."""
    blocks = backbone.family.blocks()
    if k > len(blocks):
        raise ValueError(f"finetune.lora_top_layers ({k}) exceeds the {len(blocks)} blocks of the {part} backbone")
    top = {id(m) for block in blocks[len(blocks) - k :] for m in block.modules()}
    return [n for n in names if id(backbone.model.get_submodule(n)) in top]


def lora_config(
    ft: FinetuneConfig, target_modules: list[str], modules_to_save: list[str] | None = None, base: str | None = None
) -> Any:
    """The ``peft.LoraConfig`` of finetune.lora_* on the layers ``target_modules`` (exact names): the one finetuning
    injects into each host, and the one a saved folder's adapter_config.json holds (for the whole Recommender, with
    the trained non-LoRA ``modules_to_save`` and the pretrained export as ``base``)."""
    from peft import LoraConfig

    lora = {"r": ft.lora_rank, "lora_alpha": ft.lora_alpha, "lora_dropout": ft.lora_dropout, "bias": "none"}
    return LoraConfig(**lora, target_modules=target_modules, modules_to_save=modules_to_save,
                      base_model_name_or_path=base)  # fmt: skip


def add_lora(model: Recommender, cfg: FinetuneTrainConfig) -> dict[str, list[str]]:
    """Inject PEFT LoRA layers (adapter 'default') into each part's host module; returns the adapted layer names
    per part (full names in the host, which PEFT then matches exactly; finetune.lora_top_layers keeps those of the
    item backbones' last blocks). In a host, only the LoRA weights train afterwards (PEFT freezes the rest of it)."""
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    ft, adapted = cfg.finetune, {}
    for part, targets in lora_targets(cfg).items():
        if not targets:
            adapted[part] = []
            continue
        host = _lora_host(model, part)
        expected = _check_targets(host, part, targets)
        if part != "user" and ft.lora_top_layers:
            expected = _in_top_blocks(getattr(model, part).backbone, expected, ft.lora_top_layers, part)
        if not expected:
            adapted[part] = []
            continue
        inject_adapter_in_model(lora_config(ft, expected), host)
        adapted[part] = [n for n, m in host.named_modules() if isinstance(m, LoraLayer)]
        assert adapted[part] == expected, (part, adapted[part], expected)  # PEFT adapted exactly what we checked
    return adapted


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA layer into its base layer's weights and put the base layer back in its place (the model
    then has a plain Recommender's modules and state-dict keys). Returns the number of layers merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
            merged += 1
    return merged


def lora_layers(model: nn.Module) -> dict[str, list[str]]:
    """The LoRA layers of a Recommender, per part ('text', 'image', 'user'), by full module name."""
    from peft.tuners.lora import LoraLayer

    layers: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            layers.setdefault(name.split(".", 1)[0], []).append(name)
    return layers


# ---- the mode -----------------------------------------------------------------------------------------------


def apply_mode(model: Recommender, cfg: FinetuneTrainConfig) -> dict[str, list[str]]:
    """Set what trains beyond the item backbones (whose part the config already set, :func:`mode_overrides`):
    the user encoder trains in 'full', 'frozen' and 'top', LoRA is added in 'lora'. Returns the LoRA-adapted
    layers per part ({} outside 'lora')."""
    mode = cfg.finetune.mode
    expected = BACKBONE_TRAINABLE[mode]
    for part in ("text", "image"):
        c = getattr(cfg.model, part)
        assert not c.enabled or c.trainable == expected, f"config not resolved for mode {mode}: {part} {c.trainable}"
    model.user.requires_grad_(mode in USER_TRAINS)
    return add_lora(model, cfg) if mode == "lora" else {}
