"""The model for a target domain: the pretrained architecture rebuilt on the target catalog, the pretrained weights
loaded except the catalog-dependent ones, and the finetuning mode applied.

A pretrained export (``pretrain.export.export``: ``config.json`` + ``model.safetensors``) is referred to by a
:class:`Source`: its folder and the SHA-256 of its weights, so a finetuned model that stores only what it trained
can check that it is rebuilt on the very weights it was trained from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from pretrain import hub
from pretrain.config import TrainConfig, to_dict
from pretrain.export import EXPORT_CONFIG, EXPORT_WEIGHTS, new_model
from pretrain.model import Catalog, Recommender
from shards.writer import sha256_file

from .modes import apply_mode, parameter_counts

log = logging.getLogger(__name__)

CATALOG_DEPENDENT = ("ids.weight", "prototype_of", "interests")
"""State-dict entries that belong to the pretraining catalog: item-ID embeddings (one row per source item) and
MISSRec's interest buffers (prototypes of the source items; recomputed on the target catalog every epoch). The
popularity and domain-offset buffers are not in the state dict: the target catalog gives them."""


@dataclass(frozen=True)
class Source:
    """A pretrained export: its folder (absolute) and the SHA-256 of its ``model.safetensors``."""

    path: str
    sha256: str

    @classmethod
    def open(cls, folder: str | Path) -> Source:
        """Check that ``folder`` is a momrec pretrained export, and hash its weights."""
        folder = Path(folder).resolve()
        read_export_config(folder)
        return cls(str(folder), sha256_file(folder / EXPORT_WEIGHTS))

    @classmethod
    def from_pointer(cls, pointer: dict[str, Any], path: str | Path | None = None) -> Source:
        """The source a finetuned model names, at ``path`` when it was moved; its weights must still hash the
        same."""
        folder = Path(path if path is not None else pointer["path"])
        found = cls.open(folder)
        if found.sha256 != pointer["sha256"]:
            raise ValueError(
                f"{folder / EXPORT_WEIGHTS} is not the export this model was finetuned from: its SHA-256 is "
                f"{found.sha256}, expected {pointer['sha256']}"
            )
        return found

    def pointer(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256, "weights": EXPORT_WEIGHTS}

    def weights(self) -> dict[str, torch.Tensor]:
        return safetensors.torch.load_file(str(Path(self.path) / EXPORT_WEIGHTS))


def read_export_config(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` document of a pretrained export (format checked) as version 1 laid it out, whatever its
    version: ``config`` the whole resolved config (model and loss included), ``catalog``."""
    folder = Path(folder)
    path = folder / EXPORT_CONFIG
    if not folder.is_dir():
        raise ValueError(f"pretrained export {folder} does not exist (expected the model/ folder of a pretraining "
                         "run, or 'none')")  # fmt: skip
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder}: not a momrec pretrained export ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != "momrec-pretrained":
        found = doc.get("format") if isinstance(doc, dict) else None
        raise ValueError(f"{path}: not a momrec pretrained export (format {found!r})")
    if not (folder / EXPORT_WEIGHTS).is_file():
        raise ValueError(f"{folder}: the export has no {EXPORT_WEIGHTS}")
    doc = hub.read_document(folder)  # any version this momrec reads, as version 2 has it
    return {"format": doc["format"], "version": doc["version"], "config": to_dict(hub.train_config(doc)),
            "catalog": doc["catalog"]}  # fmt: skip


@dataclass
class Transfer:
    """What :func:`transfer_weights` did: tensors loaded from the export, catalog-dependent ones left out, and
    ones the export does not have (fresh)."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"loaded": len(self.loaded), "skipped": self.skipped, "fresh": self.fresh}


def is_fresh(name: str, fresh: Sequence[str]) -> bool:
    """Whether state-dict entry ``name`` lies under one of the ``fresh`` prefixes (finetune.fresh)."""
    return any(name == p or name.startswith(p + ".") for p in fresh)


def transfer_weights(model: Recommender, state: dict[str, torch.Tensor], fresh: Sequence[str] = ()) -> Transfer:
    """Load the pretrained ``state`` into ``model`` (built on the target catalog), except the
    :data:`CATALOG_DEPENDENT` entries and the entries under the ``fresh`` prefixes (finetune.fresh: each must name
    a tensor of the model). Any other difference (a missing, extra or differently shaped tensor) means the
    architecture changed: a ValueError naming the tensors."""
    target = model.state_dict()
    unmatched = [p for p in fresh if not any(is_fresh(k, [p]) for k in target)]
    if unmatched:
        parts = sorted({".".join(k.split(".")[:2]) for k in target})
        raise ValueError(f"finetune.fresh: {unmatched} name no tensor of the model (its parts: {parts})")
    catalog_keys = set(CATALOG_DEPENDENT)
    missing = sorted(k for k in target if k not in state and k not in catalog_keys)
    extra = sorted(k for k in state if k not in target and k not in catalog_keys)
    shape = sorted(
        f"{k} {tuple(state[k].shape)} -> {tuple(target[k].shape)}"
        for k in target
        if k in state and k not in catalog_keys and state[k].shape != target[k].shape
    )
    if missing or extra or shape:
        raise ValueError(
            "the model config no longer fits the pretrained weights (only non-architectural model.* fields may be "
            f"changed for finetuning): missing {missing}, unexpected {extra}, other shapes {shape}"
        )
    report = Transfer(
        loaded=[k for k in target if k in state and k not in catalog_keys and not is_fresh(k, fresh)],
        skipped=sorted(k for k in state if k in catalog_keys or is_fresh(k, fresh)),
        fresh=sorted(k for k in target if k in catalog_keys or is_fresh(k, fresh)),
    )
    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report


@dataclass
class Prepared:
    """A finetuning model's provenance: its source (None: not pretrained), the transfer, the LoRA layers and the
    parameter counts per part (taken before any ZeRO-3 partitioning)."""

    source: Source | None
    transfer: Transfer | None
    lora: dict[str, list[str]]
    params: dict[str, dict[str, int]]


def prepare_model(cfg: TrainConfig, catalog: Catalog, source: Source | None) -> tuple[Recommender, Prepared]:
    """The Recommender of ``cfg.model`` on ``catalog``, with the weights of ``source`` (None: as initialised, the
    no-pretraining control) and ``cfg.finetune.mode`` applied."""
    model = new_model(cfg, catalog)
    transfer = None
    if source is not None:
        transfer = transfer_weights(model, source.weights(), cfg.finetune.fresh)
    lora = apply_mode(model, cfg)
    return model, Prepared(source, transfer, lora, parameter_counts(model))
