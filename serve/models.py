"""A model folder to serve, whichever stage wrote it: a pretrained export or a finetuned model, loaded by its own
stage's loader (:func:`pretrain.export.load_pretrained`, :func:`finetune.export.load_finetuned`), and what a served
catalog must refuse.

The served files score exactly as the model does only when the model's score is an inner product of a user vector
and a per-item vector: cosine similarity (``Recommender.score``: unit user @ unit items; the losses' temperature
only scales it, which leaves the ranking alone). Score fusion (``model.fusion.kind = "score"``, MISSRec's adaptive
matching) fuses per-modality cosines through a log-sum-exp, which no single inner-product index reproduces: refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from finetune.export import load_finetuned
from pretrain.config import TrainConfig
from pretrain.export import load_pretrained
from pretrain.model import Catalog, Recommender
from shards.writer import sha256_file

Stage = Literal["pretrained", "finetuned"]


@dataclass
class ServedModel:
    """A loaded model (eval mode, merged LoRA), its config and catalog, and where it came from."""

    model: Recommender
    cfg: TrainConfig
    catalog: Catalog
    stage: Stage
    folder: Path

    def pointer(self) -> dict[str, Any]:
        """What the served files were made from: the folder, its stage, and the SHA-256 of every file in it (so a
        later change to the model is visible)."""
        files = sorted(p for p in self.folder.iterdir() if p.is_file())
        return {"path": str(self.folder), "stage": self.stage, "sha256": {p.name: sha256_file(p) for p in files}}


def load_model(folder: str | Path, pretrained: str | Path | None = None) -> ServedModel:
    """The model of ``folder``: a pretrained export or a finetuned model (``pretrained``: where the finetuned
    model's pretrained export is now, when it moved). A folder that is neither is a ValueError saying why both
    loaders refused it."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise ValueError(f"--model {folder}: no such folder")
    try:
        model, cfg, catalog = load_pretrained(folder)
        return ServedModel(model, cfg, catalog, "pretrained", folder)
    except (ValueError, OSError, KeyError) as e:  # OSError: a file missing; KeyError: a document without a part
        as_pretrained = str(e)
    try:
        with torch.random.fork_rng(devices=[]):
            model, cfg, catalog = load_finetuned(folder, merge=True, pretrained=pretrained)
        return ServedModel(model, cfg, catalog, "finetuned", folder)
    except (ValueError, OSError, KeyError) as e:
        as_finetuned = str(e)
    raise ValueError(
        f"--model {folder}: not a momrec model folder (as a pretrained export: {as_pretrained}; as a finetuned "
        f"model: {as_finetuned})"
    )


def check_servable(model: Recommender) -> None:
    """A ValueError for a model whose scores an inner-product index cannot reproduce."""
    if model.fusion.per_modality_scores:
        raise ValueError(
            f"model.fusion.kind = {model.model_cfg.fusion.kind!r} (score fusion) scores users against the text and "
            "image embeddings separately and fuses the two cosines with a learned log-sum-exp: not an inner "
            "product, so no FAISS index reproduces its ranking; serve a model with another fusion kind"
        )
