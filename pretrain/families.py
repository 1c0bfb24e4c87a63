"""Hugging Face backbones: loading one (pretrained from a local folder, or random from a config), and running each
family (BERT-like, ViT, ResNet, ConvNeXt) piece by piece: stem, blocks, head.

Shape legend::

    U  items of the batch (text rows)        T  tokens per text        H  backbone width
    N  images of the batch                   P  image tokens: ViT CLS + patches, or conv positions h*w
    C, h, w  conv feature map (C = H)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

Init = Literal["pretrained", "random"]
Architecture = Literal["resnet", "vit", "convnext"]


def not_on_disk(name_or_path: str) -> str | None:
    """Why the model ``name_or_path`` (a local folder or a Hugging Face id) cannot be read offline; None if it can.
    Reads the file system and the Hugging Face cache only: nothing is downloaded, no model is loaded."""
    path = Path(name_or_path)  # as transformers reads it: no ~ expansion
    if path.is_dir():
        return None if (path / "config.json").is_file() else f"the folder {path} holds no config.json"
    if path.exists():
        return f"{path} is a file, not a model folder"
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name_or_path, "config.json")
    except ValueError:  # huggingface_hub's HFValidationError: not a possible hub id either
        return f"{name_or_path!r} is no folder and no Hugging Face model id"
    if isinstance(found, str):
        return None
    return (
        f"{name_or_path!r} is no local folder and not in the Hugging Face cache, and momrec never downloads: "
        f"where there is internet run `hf download {name_or_path}` (then copy ~/.cache/huggingface here), "
        "or set this key to the model's local folder"
    )


def check_on_disk(names: Mapping[str, str]) -> None:
    """One :class:`ValueError` naming the first config key (of ``names``: key -> name or folder) whose model is not
    on disk, before any heavy start-up."""
    for key, name in names.items():
        if (problem := not_on_disk(name)) is not None:
            raise ValueError(f"{key}: {problem}")


def load_backbone(
    name_or_path: str | None, init: Init, config_overrides: dict[str, Any] | None, model_type: str
) -> nn.Module:
    """A transformers base model: pretrained weights from a local folder, or random init from a config.

    ``init="random"`` builds the config from ``name_or_path`` (a local folder) when given, else from
    ``model_type`` (``config_overrides["model_type"]`` wins); ``config_overrides`` update it either way.
    """
    from transformers import AutoConfig, AutoModel  # slow import: only where a model is built

    overrides = dict(config_overrides or {})
    if init == "pretrained":
        if name_or_path is None:
            raise ValueError("init='pretrained' needs name_or_path (a local model folder)")
        overrides.pop("model_type", None)
        return AutoModel.from_pretrained(name_or_path, local_files_only=True, **overrides)
    if init != "random":
        raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
    if name_or_path is None:
        config = AutoConfig.for_model(overrides.pop("model_type", model_type), **overrides)
    else:
        overrides.pop("model_type", None)
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True, **overrides)
    return AutoModel.from_config(config)


class Family:
    """Adapter over one family of transformers models. Modules are looked up on every call, so wrappers that replace
    submodules (PEFT, DeepSpeed) are seen."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def stem(self) -> nn.Module:
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def head(self) -> list[nn.Module]:
        """Modules after the blocks (final norms), trainable with the top blocks."""
        return []

    def width(self) -> int:
        return self.model.config.hidden_size

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.stem()(inputs)

    def context(self, x: torch.Tensor, mask: torch.Tensor | None) -> Any:
        """What every block needs besides the hidden states (an attention mask), built once per segment."""
        return None

    def run_block(self, block: nn.Module, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        return block(x)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images only: (pooled_NH, tokens_NPH) from the output of the last block, through the head."""
        raise NotImplementedError


class _Transformer(Family):
    """A Transformer whose stem is ``embeddings``; its pooler (BERT's NSP head, ViT's) is unused and dropped."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if getattr(model, "pooler", None) is not None:
            model.pooler = None

    def stem(self) -> nn.Module:
        return self.model.embeddings


class _BertLike(_Transformer):
    """BERT, RoBERTa, MiniLM, ELECTRA...: ``embeddings`` then ``encoder.layer``. The NSP pooler is dropped."""

    def blocks(self) -> list[nn.Module]:
        return list(self.model.encoder.layer)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(input_ids=inputs)

    def context(self, x: torch.Tensor, mask: torch.Tensor | None) -> Any:
        from transformers.masking_utils import create_bidirectional_mask

        # the form (4D additive, boolean, None) depends on the attention implementation in the config
        return create_bidirectional_mask(config=self.model.config, inputs_embeds=x, attention_mask=mask)

    def run_block(self, block: nn.Module, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        out = block(x, ctx)
        return out[0] if isinstance(out, tuple) else out


class _ViT(_Transformer):
    """ViT: ``embeddings`` then ``layers`` (``encoder.layer`` before transformers 5), ``layernorm``; pooled = CLS."""

    def blocks(self) -> list[nn.Module]:
        layers = getattr(self.model, "layers", None)
        return list(layers if layers is not None else self.model.encoder.layer)

    def head(self) -> list[nn.Module]:
        return [self.model.layernorm]

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(inputs.to(self.model.embeddings.patch_embeddings.projection.weight.dtype))

    def run_block(self, block: nn.Module, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        out = block(x, None)
        return out[0] if isinstance(out, tuple) else out

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens_NPH = self.model.layernorm(x)
        return tokens_NPH[:, 0], tokens_NPH


class _ResNet(Family):
    """ResNet: ``embedder`` then ``encoder.stages``; pooled = spatial mean (parameter-free head)."""

    def stem(self) -> nn.Module:
        return self.model.embedder

    def blocks(self) -> list[nn.Module]:
        return list(self.model.encoder.stages)

    def width(self) -> int:
        return self.model.config.hidden_sizes[-1]

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.embedder(inputs.to(next(self.model.embedder.parameters()).dtype))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.mean((2, 3)), x.flatten(2).transpose(1, 2)


class _ConvNext(_ResNet):
    """ConvNeXt: ``embeddings`` then ``encoder.stages``, ``layernorm``; pooled = layernorm(spatial mean) as in
    transformers, tokens = layernorm of each position."""

    def stem(self) -> nn.Module:
        return self.model.embeddings

    def head(self) -> list[nn.Module]:
        return [self.model.layernorm]

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(inputs.to(next(self.model.embeddings.parameters()).dtype))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        norm = self.model.layernorm
        return norm(x.mean((2, 3))), norm(x.flatten(2).transpose(1, 2))


_IMAGE_FAMILIES: dict[str, type[Family]] = {"resnet": _ResNet, "vit": _ViT, "convnext": _ConvNext}


def text_family(model: nn.Module) -> Family:
    if hasattr(model, "embeddings") and hasattr(getattr(model, "encoder", None), "layer"):
        return _BertLike(model)
    raise ValueError(
        f"unsupported text backbone {type(model).__name__}: expected a BERT-like encoder (embeddings + encoder.layer)"
    )


def image_family(model: nn.Module, architecture: str) -> Family:
    if architecture not in _IMAGE_FAMILIES:
        raise ValueError(f"architecture must be one of {sorted(_IMAGE_FAMILIES)}, got {architecture!r}")
    model_type = model.config.model_type
    if model_type != architecture:
        raise ValueError(f"architecture={architecture!r} but the backbone is a {model_type!r} model")
    return _IMAGE_FAMILIES[architecture](model)
