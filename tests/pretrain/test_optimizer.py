"""optim.implementation: torch's fused AdamW steps the client optimizer under DeepSpeed at every ZeRO stage, and
trains to the losses of the single-tensor reference (float rounding apart)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.config import OptimConfig, load_config
from pretrain.distributed import init_distributed
from pretrain.engine import build
from pretrain.optim import adamw
from tests.testutil import TINY, tiny_overrides


@pytest.fixture(autouse=True)
def clean_dist_env(lone_process):
    yield


def step_losses(folders: list[str], out: Path, *more: str) -> list[float]:
    from pretrain.engine import train

    common = ["optim.max_steps=3", "optim.warmup_steps=1", "run.log_every=1", "run.eval_every=0"]
    common += ["model.text.trainable=top", "model.text.top_layers=1", "run.save_every=0"]
    train(load_config(str(TINY), tiny_overrides(folders, out, *common, *more)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/total"] for r in rows if "loss/total" in r]


@pytest.mark.parametrize("stage", [0, 3])
def test_fused_trains_to_the_losses_of_the_single_tensor_optimizer(folders, tmp_path: Path, stage: int) -> None:
    """3 steps of the tiny model: the fused kernel's first losses equal the reference's to 1e-5 relative (float32
    rounding of the update; measured differences are ~1e-7)."""
    runs = {impl: step_losses(folders, tmp_path / impl, f"optim.implementation={impl}", f"engine.zero_stage={stage}")
            for impl in ("single", "fused")}  # fmt: skip
    assert len(runs["single"]) == 3
    assert runs["fused"] == pytest.approx(runs["single"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    "more",
    [["engine.zero_stage=0"], ["engine.zero_stage=1"], ["engine.zero_stage=2", "engine.precision=bf16"],
     ["engine.zero_stage=2", "engine.offload_optimizer=true"], ["engine.zero_stage=3"]],
    ids=["zero0", "zero1", "zero2-bf16", "zero2-offload", "zero3"],
)  # fmt: skip
def test_deepspeed_steps_the_fused_optimizer_at_every_zero_stage(folders, tmp_path: Path, more: list[str]) -> None:
    cfg = load_config(str(TINY), tiny_overrides(folders, tmp_path, "optim.max_steps=2", "optim.warmup_steps=1", *more))
    run = build(cfg, init_distributed(60))
    client = run.engine.optimizer
    while not isinstance(client, torch.optim.AdamW):  # DeepSpeed's ZeRO / bf16 optimizers wrap the client's
        client = client.optimizer
    assert all(g["fused"] for g in client.param_groups)
    batch = next(iter(run.stream))
    run.engine.backward(run.engine(batch).loss)
    run.engine.step()
    # what the fused kernel stepped (ZeRO-3 points the groups at its fp32 partitions only during the step)
    states = list(client.state.values())
    assert states and all(float(s["step"]) == 1 for s in states)
    assert all(s["exp_avg"].dtype == torch.float32 and s["exp_avg"].device.type == "cpu" for s in states)
    assert any(s["exp_avg"].abs().sum() > 0 for s in states)


def test_auto_and_explicit_choices() -> None:
    cpu = [{"params": [torch.nn.Parameter(torch.zeros(3))], "weight_decay": 0.0}]
    assert adamw(cpu, OptimConfig()).defaults["fused"]
    single = adamw(cpu, OptimConfig(implementation="single")).defaults
    assert not single["fused"] and single["foreach"] is False
    assert adamw(cpu, OptimConfig(implementation="foreach")).defaults["foreach"]
    meta = [{"params": [torch.nn.Parameter(torch.zeros(3, device="meta"))]}]
    assert not adamw(meta, OptimConfig()).defaults["fused"]
    with pytest.raises(ValueError, match="optim.implementation='fused' needs"):
        adamw(meta, OptimConfig(implementation="fused"))
