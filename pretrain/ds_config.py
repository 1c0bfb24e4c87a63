"""The DeepSpeed config of a run, derived from momrec's config.

Micro-batch, accumulation, clipping, precision and ZeRO stage come from their momrec keys, and ``engine.deepspeed``'s
DeepSpeed-only keys are merged last, so no number lives in two places.
"""

from __future__ import annotations

import copy
from typing import Any

from .config import TrainConfig
from .configlib import deep_merge

__all__ = ["deepspeed_config"]


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of ``cfg`` on ``world_size`` ranks: derived numbers, then engine.deepspeed merged (its
    keys checked by :class:`pretrain.config.EngineConfig`: none of :data:`pretrain.config.DEEPSPEED_DERIVED`)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    cfg.engine.validate()  # again: the section may have been changed after it was built
    micro, accum = cfg.data.stream.batch_size, cfg.optim.grad_accum
    zero: dict[str, Any] = {"stage": cfg.engine.zero_stage}
    derived: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": cfg.engine.precision == "bf16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # a torch AdamW client optimizer under ZeRO
        "steps_per_print": 2**31 - 1,  # momrec logs itself (run.log_every)
        "wall_clock_breakdown": False,
    }
    if cfg.engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
        derived["zero_force_ds_cpu_optimizer"] = False  # else DeepSpeed refuses a torch AdamW under ZeRO-Offload
    return deep_merge(derived, copy.deepcopy(cfg.engine.deepspeed))
