"""A finetuned model on disk: only what the pretrained export cannot give, plus a pointer to that export.

Layout of a folder (``run.out_dir/model`` at the end of a run, ``run.out_dir/best`` for the best validation)::

    finetuned.json              format, the pointer to the pretrained export (its folder and the SHA-256 of its
                                model.safetensors; null for --from none), the resolved config (finetune section
                                included), the target catalog, the LoRA layers and the tensors saved
    adapter_model.safetensors   the trainable parameters (LoRA A/B under their PEFT names, heads, fresh ID
                                embeddings...) and every buffer (batch-norm statistics, interest prototypes); with
                                no pretrained export behind it, the whole state dict

:func:`load_finetuned` rebuilds the model exactly as finetuning did (pretrained weights, mode, LoRA layers), loads
the saved tensors, and by default folds LoRA into the weights. JSON and safetensors only: no pickle.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from pretrain.config import TrainConfig
from pretrain.configlib import to_dict
from pretrain.distributed import rank
from pretrain.model import Catalog, Recommender
from pretrain.outputs import rank0_folder, tensor_bytes

from .config import FinetuneTrainConfig, from_dict
from .modes import lora_layers, merge_lora
from .transfer import Source, is_fresh, prepare_model

FORMAT = "momrec-finetuned"
VERSION = 1
DOC = "finetuned.json"
WEIGHTS = "adapter_model.safetensors"


def saved_names(model: nn.Module, pretrained: bool, fresh: Sequence[str] = ()) -> list[str]:
    """The state-dict entries a finetuned folder holds: trainable parameters, buffers and the parts not loaded
    from the export (``fresh``, finetune.fresh); everything when there is no pretrained export to rebuild the rest
    from."""
    state_keys = list(model.state_dict(keep_vars=True))
    if not pretrained:
        return state_keys
    params = dict(model.named_parameters())
    return [k for k in state_keys if k not in params or params[k].requires_grad or is_fresh(k, fresh)]


@contextlib.contextmanager
def _gathered(engine: Any, params: list[nn.Parameter]) -> Iterator[None]:
    """Full tensors of ``params`` inside the block; under ZeRO-3 every rank must enter it (an adapter saved
    outside ``GatheredParameters`` comes out empty)."""
    if engine is None or engine.zero_optimization_stage() != 3:
        yield
        return
    import deepspeed  # imported by the engine already, with its accelerator chosen

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def save_finetuned(
    model: nn.Module,
    cfg: FinetuneTrainConfig,
    catalog: Catalog,
    source: Source | None,
    folder: str | Path,
    engine: Any = None,
) -> Path:
    """Write ``folder`` (see the module docstring) from ``model`` (the engine's module when ``engine`` is given:
    every rank must call it then; rank 0 writes). Atomic: a crash leaves the previous folder or none; space-checked: a
    full disk is one ValueError on every rank (:func:`pretrain.outputs.rank0_folder`)."""
    folder = Path(folder)
    names = saved_names(model, source is not None, cfg.finetune.fresh)
    wanted = set(names)
    params = [p for n, p in model.named_parameters() if n in wanted]
    with _gathered(engine, params):
        tensors = {}
        if rank() == 0:
            state = model.state_dict()
            tensors = {k: state[k].detach().cpu().clone().contiguous() for k in names}
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "pretrained": None if source is None else source.pointer(),
        "mode": cfg.finetune.mode,
        "lora": lora_layers(model),
        "tensors": names,
        "config": to_dict(cfg),
        "catalog": catalog.to_dict(),
    }
    text = json.dumps(doc, indent=1) + "\n"
    with rank0_folder(folder, tensor_bytes(tensors) + len(text), f"the finetuned model {folder}") as tmp:
        if tmp is not None:
            safetensors.torch.save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
            (tmp / DOC).write_text(text, encoding="utf-8")
    return folder


def read_finetuned(folder: str | Path) -> dict[str, Any]:
    """The ``finetuned.json`` document of a finetuned folder (format checked)."""
    path = Path(folder) / DOC
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder}: not a momrec finetuned model ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise ValueError(f"{path}: not a momrec finetuned model (format {found!r})")
    if doc.get("version") != VERSION:
        raise ValueError(f"{path}: format version {doc.get('version')!r}, this momrec reads {VERSION}")
    return doc


def load_finetuned(
    folder: str | Path, merge: bool = True, pretrained: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[Recommender, TrainConfig, Catalog]:
    """The finetuned model (eval mode), its config and catalog. The model is rebuilt as finetuning built it: the
    pretrained export (at ``pretrained`` when it moved; its weights must hash as recorded), the mode, the LoRA
    layers; then the saved tensors are loaded. ``merge``: fold LoRA into the weights (a plain Recommender's
    modules; scores equal the unmerged model's up to float rounding)."""
    folder = Path(folder)
    doc = read_finetuned(folder)
    cfg, catalog = from_dict(doc["config"]), Catalog.from_dict(doc["catalog"])
    source = None if doc["pretrained"] is None else Source.from_pointer(doc["pretrained"], pretrained)
    with torch.random.fork_rng(devices=[]):  # the LoRA and ID initialisation drawn here is overwritten anyway
        model, _ = prepare_model(cfg, catalog, source)
    tensors = safetensors.torch.load_file(str(folder / WEIGHTS))
    expected = set(saved_names(model, source is not None, cfg.finetune.fresh))
    if set(tensors) != expected or set(doc["tensors"]) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"{folder / WEIGHTS} does not fit its config: missing {missing}, unexpected {extra}")
    model.load_state_dict(tensors, strict=False)
    if merge:
        merge_lora(model)
    return model.to(device).eval(), cfg, catalog
