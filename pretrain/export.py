"""The model a config describes: built fresh, exported in the Hugging Face layout, and loaded back in one call.

Export (``run.out_dir/model``, ``best``, ``start``): ``config.json`` (the architecture, the resolved config and the
catalog), ``model.safetensors`` (the full state dict, gathered across ranks under ZeRO-3) and a model card
``README.md``; the layout is ``Recommender.save_pretrained``'s (:mod:`pretrain.hub`), so
``Recommender.from_pretrained(folder)`` reads it too. :func:`load_pretrained` returns the model with its resolved
config and catalog; it also reads the version 1 layout (config.json + model.safetensors, no card). No pickle.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hub
from .config import TrainConfig
from .distributed import rank
from .hub import EXPORT_CONFIG, EXPORT_WEIGHTS, MODEL_CARD, VERSION
from .model import Catalog, Recommender
from .model_card import last_validation
from .outputs import rank0_folder, tensor_bytes

__all__ = ["EXPORT_CONFIG", "EXPORT_WEIGHTS", "MODEL_CARD", "VERSION", "export", "load_pretrained", "new_model"]
CARD_BYTES = 1 << 16
"""Room reserved for the model card when the export's space is checked."""

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
    model = Recommender(cfg.model, cfg.loss, catalog, image_size=cfg.data.stream.image_size)
    model._hub_mixin_config = hub.export_document(cfg, catalog.to_dict())  # what save_pretrained writes
    return model


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
    """Write ``folder`` (config.json, model.safetensors, README.md; rank 0, every rank must call it): the engine's
    default exporter. The card reports the last validation in ``run.out_dir/metrics.jsonl``."""
    folder = Path(folder)
    state = gathered_state_dict(engine, to_rank0_only=True)
    doc = hub.export_document(cfg, catalog.to_dict())
    needed = tensor_bytes(state) + len(hub.dumps(doc)) + CARD_BYTES
    with rank0_folder(folder, needed, f"the export {folder}") as tmp:  # space-checked, atomic
        if tmp is not None:
            hub.write_folder(tmp, engine.module, state, doc, last_validation(cfg.run.out_dir), card_path=folder)
    return folder


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu") -> tuple[Recommender, TrainConfig, Catalog]:
    """The exported model (eval mode), its config and catalog; every weight must match the config's model. Reads
    format versions 1 and 2; anything else is a one-line ValueError."""
    doc = hub.read_document(folder)  # config.json read once: the model's and the run's config both come from it
    model = Recommender.from_document(Path(folder), doc, device)
    return model, hub.train_config(doc), model.catalog
