"""The pretrained-model folder in the Hugging Face layout: what ``Recommender.save_pretrained`` and the engine's export
write, and what ``Recommender.from_pretrained`` and :func:`pretrain.export.load_pretrained` read.

A folder (format version 2)::

    config.json         {"format": "momrec-pretrained", "version": 2, "architectures": ["Recommender"],
                         "model": model.* (the architecture), "loss": loss.*, "image_size": the images' side,
                         "config": the rest of the resolved config (data, optim, engine, run; model and loss
                                   are the top-level sections above),
                         "catalog": the domains, their sizes and item popularity}
    model.safetensors   the full state dict
    README.md           the model card (pretrain/model_card.py)

Version 1 folders (``{"format", "version": 1, "config": the whole resolved config, "catalog"}`` + the weights, no
card) are read too: :func:`read_document` turns their config.json into version 2's. JSON and safetensors only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from .config import TrainConfig, from_dict, to_dict
from .model_card import model_card
from .model_config import LossConfig, ModelConfig
from .parts import parameter_counts

EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
MODEL_CARD = "README.md"
FORMAT = "momrec-pretrained"
VERSION = 2
"""The export format's version (``config.json``'s ``version``); :func:`read_document` also reads version 1."""
READS = (1, 2)
ARCHITECTURE = ("model", "loss", "image_size")
"""The top-level keys of config.json that build the model (``Recommender``'s arguments, with the catalog)."""
CONVERT = (
    "re-export it with `python -m pretrain ... --resume` from its run, or load it with the momrec version that wrote "
    "it and call model.save_pretrained(folder)"
)


def document(
    model: ModelConfig,
    loss: LossConfig,
    catalog: Mapping[str, Any],
    image_size: int | None,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The config.json of a version 2 folder; ``config``: the resolved config's sections other than model and loss
    (absent for a Recommender built by hand)."""
    doc: dict[str, Any] = {"format": FORMAT, "version": VERSION, "architectures": ["Recommender"]}
    doc.update(model=to_dict(model), loss=to_dict(loss), image_size=image_size)
    if config is not None:
        doc["config"] = dict(config)
    doc["catalog"] = dict(catalog)
    return doc


def export_document(cfg: TrainConfig, catalog: Mapping[str, Any]) -> dict[str, Any]:
    """The config.json of the export of a run with the resolved config ``cfg``."""
    rest = {k: v for k, v in to_dict(cfg).items() if k not in ("model", "loss")}
    return document(cfg.model, cfg.loss, catalog, cfg.data.stream.image_size, rest)


def read_document(folder: str | Path) -> dict[str, Any]:
    """The config.json of a pretrained folder as version 2 has it (a version 1 one converted); a one-line ValueError
    for anything else."""
    path = Path(folder) / EXPORT_CONFIG
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder}: not a momrec export ({e})") from None
    found = doc.get("format") if isinstance(doc, dict) else None
    if found != FORMAT:
        raise ValueError(f"{path}: not a momrec export (format {found!r}; a momrec pretrained model has {FORMAT!r})")
    version = doc.get("version")
    if version not in READS:
        raise ValueError(
            f"{path}: momrec export format version {version!r}, this momrec reads {list(READS)}: {CONVERT}"
        )
    missing = [k for k in (("config", "catalog") if version == 1 else (*ARCHITECTURE, "catalog")) if k not in doc]
    if missing:
        raise ValueError(f"{path}: a version {version} momrec export without {missing}: {CONVERT}")
    if version == 1:
        return export_document(from_dict(doc["config"]), doc["catalog"])
    return doc


def train_config(doc: Mapping[str, Any]) -> TrainConfig:
    """The resolved config of a (version 2) config.json: its sections, the defaults for those it lacks."""
    table = {**doc.get("config", {}), "model": doc["model"], "loss": doc["loss"]}
    if doc["image_size"] is not None and "config" not in doc:
        table["data"] = {"stream": {"image_size": doc["image_size"]}}
    cfg = from_dict(table)
    if doc["image_size"] is not None and cfg.data.stream.image_size != doc["image_size"]:
        raise ValueError(
            f"config.json: image_size {doc['image_size']} differs from config.data.stream.image_size "
            f"{cfg.data.stream.image_size}"
        )
    return cfg


def dumps(doc: Mapping[str, Any]) -> str:
    """config.json's text: indented, the catalog's long popularity lists one line per domain."""
    lines = [
        f"  {json.dumps(k)}: {json.dumps(v, indent=2)}".replace("\n", "\n  ") for k, v in doc.items() if k != "catalog"
    ]
    if "catalog" in doc:
        entries = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in doc["catalog"].items())
        lines.append(f'  "catalog": {{\n{entries}\n  }}')
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_folder(
    folder: str | Path,
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    doc: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
    card_path: str | Path | None = None,
) -> None:
    """Write the three files of a folder (an existing one; the caller makes it atomic if needed): ``state`` (the
    ``module``'s full state dict), config.json ``doc``, and the card with the ``metrics`` known (naming the folder
    as ``card_path``, default ``folder``)."""
    folder = Path(folder)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    card = model_card(doc, train_config(doc), parameter_counts(module, state), metrics or {}, card_path or folder)
    safetensors.torch.save_file(tensors, str(folder / EXPORT_WEIGHTS), metadata={"format": "pt"})
    (folder / EXPORT_CONFIG).write_text(dumps(doc), encoding="utf-8")
    (folder / MODEL_CARD).write_text(card, encoding="utf-8")


def load_weights(model: nn.Module, folder: str | Path) -> None:
    """Load ``folder/model.safetensors`` into ``model``: every tensor must be there and no other."""
    path = Path(folder) / EXPORT_WEIGHTS
    if not path.is_file():
        raise ValueError(f"{folder}: the export has no {EXPORT_WEIGHTS}")
    state = safetensors.torch.load_file(str(path))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit its config: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(state, strict=True)


def local_folder(model_id: str | Path, **hub_args: Any) -> Path:
    """``model_id`` itself when it is a folder; else a Hugging Face Hub repository id, resolved through
    ``huggingface_hub.snapshot_download`` (``hub_args``: revision, cache_dir, force_download, local_files_only,
    token; ``HF_HUB_OFFLINE=1`` keeps it to the local cache)."""
    if Path(model_id).is_dir():
        return Path(model_id)
    from huggingface_hub import snapshot_download

    wanted = ("revision", "cache_dir", "force_download", "local_files_only", "token")
    kwargs = {k: hub_args[k] for k in wanted if k in hub_args}
    files = [EXPORT_CONFIG, EXPORT_WEIGHTS, MODEL_CARD]
    return Path(snapshot_download(str(model_id), allow_patterns=files, **kwargs))
