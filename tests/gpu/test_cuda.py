"""What only a GPU can show (skipped without CUDA; ``launch/gpu_check.sh`` runs them on a lent GPU).

The model on CUDA computes what it computes on the CPU (fp32, within float tolerance), a bf16 autocast step trains
on CUDA, and full ranking on CUDA gives the CPU's metrics (ties are broken by the same seeded order).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from pretrain.config import TrainConfig, load_config
from pretrain.model import Catalog, Recommender
from shards.stream import SequenceStream

DEVICE = torch.device(os.environ.get("MOMREC_TEST_DEVICE", "cuda"))
"""The device under test; MOMREC_TEST_DEVICE=cpu runs these tests' logic on the CPU (a dry run without GPU)."""
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU (launch/gpu_check.sh)"
)

TINY = Path(__file__).resolve().parents[2] / "launch/configs/tiny.toml"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[str]:
    from shards.build import BuildOptions, build
    from shards.synth import synthesize

    root = tmp_path_factory.mktemp("gpu-shards")
    out = []
    for src in synthesize(root / "src", domains=["books", "movies"], users_per_domain=30, items_per_domain=40):
        build(src, root / "shards" / src.name, BuildOptions(min_user_interactions=3, image_size=32), progress=False)
        out.append(str(root / "shards" / src.name))
    return out


@pytest.fixture(autouse=True)
def exact_matmuls():
    """fp32 comparisons need fp32 products: no TF32 on Ampere and later (restored afterwards)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def config(folders: list[str]) -> TrainConfig:
    return load_config(str(TINY), [f"data.domains={json.dumps(folders)}", "data.stream.num_workers=0",
                                   "model.user.dropout=0.0"])  # fmt: skip


def first_batch(cfg: TrainConfig):
    return next(iter(SequenceStream(cfg.data.domains, cfg.data.stream, rank=0, world_size=1)))


def test_forward_on_cuda_matches_the_cpu(folders) -> None:
    cfg = config(folders)
    torch.manual_seed(0)
    cpu = Recommender(cfg.model, cfg.loss, Catalog.from_folders(folders)).eval()
    gpu = copy.deepcopy(cpu).to(DEVICE)
    batch = first_batch(cfg)
    with torch.no_grad():
        want, got = cpu(batch).loss, gpu(batch.to(DEVICE)).loss
    assert torch.isfinite(got)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_a_bf16_step_trains_on_cuda(folders) -> None:
    cfg = config(folders)
    torch.manual_seed(0)
    model = Recommender(cfg.model, cfg.loss, Catalog.from_folders(folders)).to(DEVICE).train()
    batch = first_batch(cfg).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    losses = []
    for _ in range(8):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses


def test_full_ranking_on_cuda_gives_the_cpus_metrics(folders) -> None:
    from pretrain.ranking import EvalOptions, evaluate_domain

    cfg = config(folders)
    torch.manual_seed(0)
    model = Recommender(cfg.model, cfg.loss, Catalog.from_folders(folders)).eval()
    on_cpu = evaluate_domain(model, folders[0], 0, cfg.data.stream, EvalOptions()).metrics()
    on_gpu = evaluate_domain(copy.deepcopy(model).to(DEVICE), folders[0], 0, cfg.data.stream, EvalOptions()).metrics()
    assert on_gpu.keys() == on_cpu.keys()
    for key, value in on_cpu.items():
        assert on_gpu[key] == pytest.approx(value, abs=1e-3), key
