"""The model a config describes: built fresh, exported Hugging Face-style, and loaded back in one call.

Export (``run.out_dir/model``): ``config.json`` (the resolved config and the catalog) and ``model.safetensors``
(the full state dict, gathered across ranks under ZeRO-3); :func:`load_pretrained` rebuilds the model from them
with :func:`new_model`, the engine's default model factory. The export holds no pickle.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from .config import TrainConfig, from_dict, to_dict
from .distributed import rank
from .model import Catalog, Recommender
from .outputs import rank0_folder, tensor_bytes

EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
VERSION = 1
"""The export format's version (``config.json``'s ``version``)."""

ModelFactory = Callable[[TrainConfig, Catalog], nn.Module]
"""Builds the model to train from the resolved config and the catalog of the run's domains (called on every rank
with the same seed, before DeepSpeed wraps the model; only parameters with requires_grad are optimized; also
builds the full evaluation copy under ZeRO-3: :func:`pretrain.validate.evaluation_model`)."""

Exporter = Callable[[Any, TrainConfig, Catalog, Path], Path]
"""Writes the engine's model into a folder: ``(engine, cfg, catalog, folder) -> folder``; every rank calls it
(:func:`export` is the default; finetune's saves the trained tensors only)."""


def new_model(cfg: TrainConfig, catalog: Catalog) -> Recommender:
    """The plain Recommender of ``cfg`` on ``catalog``, freshly initialised (the engine's default
    :data:`ModelFactory`: pretraining)."""
    return Recommender(cfg.model, cfg.loss, catalog, image_size=cfg.data.stream.image_size)


def gathered_state_dict(engine: Any, to_rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The full state dict on the CPU (on rank 0 only, or on every rank); under ZeRO-3 every rank must call it:
    the partitioned parameters are gathered inside ``deepspeed.zero.GatheredParameters`` on all ranks."""
    module = engine.module
    if engine.zero_optimization_stage() != 3:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    import deepspeed  # already imported by the engine (with its accelerator chosen)

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if to_rank0_only and rank() != 0:
            return {}
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def export(engine: Any, cfg: TrainConfig, catalog: Catalog, folder: str | Path) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` (rank 0; every rank must call it): the
    engine's default exporter."""
    folder = Path(folder)
    state = gathered_state_dict(engine, to_rank0_only=True)
    doc = {"format": "momrec-pretrained", "version": VERSION, "config": to_dict(cfg), "catalog": catalog.to_dict()}
    text = json.dumps(doc, indent=1) + "\n"
    with rank0_folder(folder, tensor_bytes(state) + len(text), f"the export {folder}") as tmp:  # space-checked
        if tmp is not None:
            safetensors.torch.save_file(state, str(tmp / EXPORT_WEIGHTS), metadata={"format": "pt"})
            (tmp / EXPORT_CONFIG).write_text(text, encoding="utf-8")
    return folder


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu") -> tuple[Recommender, TrainConfig, Catalog]:
    """The exported model (eval mode), its config and catalog; every weight must match the config's model."""
    folder = Path(folder)
    try:
        doc = json.loads((folder / EXPORT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder}: not a momrec export ({e})") from None
    if doc.get("format") != "momrec-pretrained":
        raise ValueError(f"{folder / EXPORT_CONFIG}: not a momrec export (format {doc.get('format')!r})")
    cfg, catalog = from_dict(doc["config"]), Catalog.from_dict(doc["catalog"])
    model = new_model(cfg, catalog)
    state = safetensors.torch.load_file(str(folder / EXPORT_WEIGHTS))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{folder / EXPORT_WEIGHTS} does not fit its config: missing {missing}, unexpected {unexpected}"
        )
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), cfg, catalog
