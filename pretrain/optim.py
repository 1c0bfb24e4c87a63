"""The optimizer and its schedule: torch's AdamW over parameter groups, and warm-up + cosine learning rates.

Groups (:func:`param_groups`): the HF backbones' own weights take ``optim.encoder_lr`` (when set), everything else
``optim.lr``; biases, norm weights and embedding tables are not decayed. :func:`adamw` picks torch's fused, foreach
or single-tensor kernel (``optim.implementation``); :func:`lr_schedule` is a LambdaLR of :func:`lr_factor`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from .backbone import Backbone
from .config import OptimConfig


def _no_decay(name: str, param: nn.Parameter, embedding_ids: set[int]) -> bool:
    """Biases, norm weights (1-d) and embedding tables (ID, position, token) are not decayed."""
    return param.ndim <= 1 or id(param) in embedding_ids or "embedding" in name.rsplit(".", 1)[-1]


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: (encoder_lr for the HF backbones' own weights | lr) x (decay | no
    decay). LoRA weights inside a backbone (finetune) are new parameters, not pretrained ones: they get lr."""
    encoder_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, Backbone)
        for n, p in m.named_parameters()
        if ".lora_" not in f".{n}"
    }
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = optim.encoder_lr if optim.encoder_lr is not None and id(param) in encoder_ids else optim.lr
        decay = 0.0 if _no_decay(name, param, embedding_ids) else optim.weight_decay
        groups.setdefault((lr, decay), []).append(param)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


FUSED_DEVICES = ("cpu", "cuda")
"""Device types with torch's fused AdamW kernel (floating-point tensors; CPU since torch 2.4)."""
FOREACH_DEVICES = ("cuda",)
"""Device types with native foreach kernels (elsewhere torch runs foreach ops one tensor at a time)."""


def adamw(groups: list[dict[str, Any]], optim: OptimConfig) -> torch.optim.AdamW:
    """torch's AdamW over ``groups`` (:func:`param_groups`) with optim's rates, betas, eps and implementation.
    Under ZeRO, DeepSpeed later points the groups at its fp32 partitions (same device type) and steps those."""
    params = [p for g in groups for p in g["params"]]
    devices = {p.device.type for p in params}
    floats = all(p.is_floating_point() for p in params)
    implementation = optim.implementation
    if implementation == "auto":
        fused = floats and devices <= set(FUSED_DEVICES)
        implementation = "fused" if fused else "foreach" if devices <= set(FOREACH_DEVICES) else "single"
    elif implementation == "fused" and not (floats and devices <= set(FUSED_DEVICES)):
        raise ValueError(f"optim.implementation='fused' needs floating-point parameters on {FUSED_DEVICES}, got "
                         f"{sorted(devices)}: use 'auto'")  # fmt: skip
    kind = {"fused": True} if implementation == "fused" else {"foreach": implementation == "foreach"}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, **kind)


def lr_factor(step: int, *, warmup: int, max_steps: int, cosine: bool, min_ratio: float) -> float:
    """LambdaLR factor of optimizer step ``step``: linear warm-up to 1, then cosine to min_ratio (or constant)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if not cosine:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine (or constant). A partial, not a callable object: LambdaLR saves an object's ``__dict__``
    and restores it on load, so a resumed run would keep the old max_steps; the step count is what is restored."""
    factor = functools.partial(
        lr_factor,
        warmup=optim.warmup_steps,
        max_steps=optim.max_steps,
        cosine=optim.schedule == "cosine",
        min_ratio=optim.min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
