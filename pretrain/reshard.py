"""A ZeRO checkpoint resumed on another number of ranks: DeepSpeed's per-rank partitions are merged into whole
per-parameter tensors (fp32 master weights, Adam's ``exp_avg`` and ``exp_avg_sq``), and each rank of the new world
cuts its own partitions out of them again, so the optimizer goes on exactly where it was.

DeepSpeed refuses this itself ("Automatic adjustment of ZeRO's optimizer state partitioning with a new world size
is not currently supported"), and its universal-checkpoint route (``ds_to_universal``) converts a whole checkpoint
with ``torch.load(weights_only=False)`` (see :mod:`pretrain.checkpoint` on why we never do that). Here the files
are read with the caller's safe loader, and the layouts are DeepSpeed 0.19's:

* ZeRO 1-2: each rank's ``*zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` holds, per parameter group, a flat fp32
  partition and Adam's two flat moments in the same layout, with ``param_slice_mappings`` (name -> where its
  fragment lies in that partition); a parameter's fragments, in rank order, are the whole parameter.
* ZeRO 3: every parameter is cut into ``ceil(numel / world)`` elements a rank, laid one after the other in each
  rank's flat groups, in the order of ``param_shapes`` (as ``deepspeed.utils.zero_to_fp32`` reads them).

Written into the live engine: this rank's flat fp32 partitions, the base optimizer's state (moments, step) and
group hyperparameters, the module's own weights (cast from the fp32 masters), buffers and frozen weights (rank 0's),
the learning-rate schedule and DeepSpeed's step counters. ZeRO 0 keeps whole states in one file that DeepSpeed
loads on any world size. Every rank reads every rank's optimizer file: the whole model and its moments are held
in CPU memory (16 bytes a parameter) while it loads.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Loader = Callable[[Path], Any]
MOMENTS = ("exp_avg", "exp_avg_sq")
KEYS = ("fp32", *MOMENTS)
_OPTIM = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")
Whole = dict[str, dict[str, torch.Tensor]]
"""key (:data:`KEYS`) -> parameter name -> the whole fp32 tensor."""


def optim_files(folder: Path, world: int) -> list[Path]:
    """The saved ranks' optimizer files, in rank order (a ValueError unless there is one for each of ``world``)."""
    found = {int(m.group(1)): f for f in folder.iterdir() if (m := _OPTIM.fullmatch(f.name))}
    if sorted(found) != list(range(world)):
        raise ValueError(f"{folder}: expected the ZeRO optimizer files of ranks 0..{world - 1}, found {sorted(found)}")
    return [found[r] for r in range(world)]


def _shapes(model_state: dict[str, Any]) -> dict[str, torch.Size]:
    return {name: torch.Size(shape) for group in model_state["param_shapes"] for name, shape in group.items()}


def merge_zero12(optims: list[dict[str, Any]], shapes: dict[str, torch.Size]) -> Whole:
    """Whole tensors from the ZeRO 1-2 partitions of every saved rank (``optimizer_state_dict`` of each)."""
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {k: defaultdict(list) for k in KEYS}
    for osd in optims:
        states = osd["base_optimizer_state"]["state"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            flats = {"fp32": osd["single_partition_of_fp32_groups"][g], **{k: states[g][k] for k in MOMENTS}}
            for name, where in mapping.items():
                for k in KEYS:
                    pieces[k][name].append(flats[k].narrow(0, where.start, where.numel))
    return {k: {n: _join(n, pieces[k][n], shape) for n, shape in shapes.items()} for k in KEYS}


def merge_zero3(optims: list[dict[str, Any]], shapes: dict[str, torch.Size]) -> Whole:
    """Whole tensors from the ZeRO-3 partitions of every saved rank (``optimizer_state_dict`` of each)."""
    world = len(optims)
    streams = []  # per rank: key -> its flat groups laid end to end
    for osd in optims:
        states = osd["optimizer_state_dict"]["state"]
        groups = range(len(osd["fp32_flat_groups"]))
        streams.append({"fp32": torch.cat(list(osd["fp32_flat_groups"])),
                        **{k: torch.cat([states[g][k] for g in groups]) for k in MOMENTS}})  # fmt: skip
    out: Whole = {k: {} for k in KEYS}
    offset = 0
    for name, shape in shapes.items():
        part = math.ceil(shape.numel() / world)
        for k in KEYS:
            out[k][name] = _join(name, [s[k].narrow(0, offset, part) for s in streams], shape)
        offset += part
    if offset != streams[0]["fp32"].numel():
        raise ValueError(f"ZeRO-3 partitions hold {streams[0]['fp32'].numel()} elements a rank, the shapes {offset}")
    return out


def _join(name: str, pieces: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    flat = torch.cat(pieces) if pieces else torch.empty(0)
    if flat.numel() < shape.numel():
        raise ValueError(f"the saved partitions hold {flat.numel()} elements of {name}, which has {shape.numel()}")
    return flat[: shape.numel()].view(shape).float().clone()


def read(folder: Path, world: int, stage: int, load: Loader) -> tuple[Whole, dict[str, Any], dict[str, Any]]:
    """(whole tensors, rank 0's model-states file, rank 0's ZeRO optimizer state) of the checkpoint in ``folder``,
    saved by ``world`` ranks at ZeRO ``stage`` (1-3)."""
    model_name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    model_state = load(folder / model_name)
    optims = [load(f)["optimizer_state_dict"] for f in optim_files(folder, world)]
    merge = merge_zero3 if stage == 3 else merge_zero12
    whole = merge(optims, _shapes(model_state))
    if stage == 3 and model_state.get("frozen_param_shapes"):  # frozen weights are partitioned too
        frozen = [load(folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")["frozen_param_fragments"]
                  for r in range(world)]  # fmt: skip
        for name, shape in model_state["frozen_param_shapes"].items():
            whole["fp32"][name] = _join(name, [f[name].flatten() for f in frozen], torch.Size(shape))
    return whole, model_state, optims[0]


# ---- into the live engine --------------------------------------------------------------------------------


def _layout(engine: Any) -> tuple[list[torch.Tensor], list[tuple[int, int, str, int, int]]]:
    """This rank's flat fp32 partitions, and where each parameter's share goes: (group, offset in the flat
    partition, parameter name, offset in the flattened parameter, elements)."""
    opt, names = engine.optimizer, {id(p): n for n, p in engine.module.named_parameters()}
    spots = []
    if engine.zero_optimization_stage() == 3:
        flats = list(opt.fp32_partitioned_groups_flat)
        for group in opt.fp16_groups:
            for p in group:
                g, offset, part = opt.grad_position[opt.get_param_id(p)]
                start = opt._get_param_partition_rank(p) * part
                spots.append((g, offset, names[id(p)], start, max(0, min(part, p.ds_numel - start))))
        return flats, spots
    flats = list(opt.single_partition_of_fp32_groups)
    for group in opt.bit16_groups:
        for p in group:
            if (m := getattr(p, "_hp_mapping", None)) is not None:
                where = m.lp_fragment_address
                spots.append((m.param_group_index, m.hp_fragment_address.start, names[id(p)], where.start, where.numel))
    return flats, spots


def write(engine: Any, whole: Whole, model_state: dict[str, Any], optim: dict[str, Any]) -> None:
    """Put the merged state into ``engine`` (ZeRO 1-3, built for this world and not yet trained); every rank."""
    stage3 = engine.zero_optimization_stage() == 3
    base = engine.optimizer.optimizer  # torch AdamW over this rank's flat fp32 partitions
    saved = optim["optimizer_state_dict"] if stage3 else optim["base_optimizer_state"]
    if len(saved["param_groups"]) != len(base.param_groups):
        raise ValueError(f"the checkpoint's optimizer has {len(saved['param_groups'])} parameter groups, this one "
                         f"{len(base.param_groups)}")  # fmt: skip
    flats, spots = _layout(engine)
    parts = [{k: torch.zeros_like(flat) for k in KEYS} for flat in flats]
    for g, offset, name, start, numel in spots:
        for k in KEYS:
            parts[g][k].narrow(0, offset, numel).copy_(whole[k][name].flatten().narrow(0, start, numel))
    step = saved["state"][0]["step"]
    for flat, part in zip(flats, parts):
        flat.data.copy_(part["fp32"])
        base.state[flat] = {"step": step.clone() if torch.is_tensor(step) else step,
                            **{k: part[k].to(flat.device) for k in MOMENTS}}  # fmt: skip
    for group, old in zip(base.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in old.items() if k != "params"})
    _write_module(engine, whole["fp32"], model_state)
    engine.lr_scheduler.load_state_dict(model_state["lr_scheduler"])
    engine.global_steps, engine.skipped_steps = model_state["global_steps"], model_state["skipped_steps"]
    engine.global_samples = model_state.get("global_samples", engine.global_steps * engine.train_batch_size())


@torch.no_grad()
def _write_module(engine: Any, fp32: dict[str, torch.Tensor], model_state: dict[str, Any]) -> None:
    """The module's weights (cast from the fp32 masters) and rank 0's buffers; under ZeRO-3 inside
    ``GatheredParameters`` so that DeepSpeed partitions the new values again."""
    import deepspeed  # imported by the engine already, with its accelerator chosen

    module = engine.module
    buffers = {n: model_state["module"][n] for n in model_state["buffer_names"]}
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(fp32))
    if engine.zero_optimization_stage() == 3:
        if missing:
            raise ValueError(f"the checkpoint holds no weights for {missing[:5]}")
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            for name, p in params.items():
                p.data.copy_(fp32[name])
    else:
        module.load_state_dict(model_state["module"], strict=True)  # frozen weights and buffers, whole
        for name, p in params.items():
            if name in fp32:
                p.data.copy_(fp32[name])
    for name, value in buffers.items():
        module.get_buffer(name).copy_(value)
