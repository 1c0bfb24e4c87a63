"""Checkpoint bookkeeping without an engine: the ``latest`` pointer, pruning, RNG states, and what the export
loader refuses (the end-to-end save/resume/export runs are in test_engine.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from pretrain import checkpoint
from pretrain.config import TrainConfig, load_config, to_dict
from pretrain.export import load_pretrained

TINY = Path(__file__).resolve().parents[2] / "launch/configs/tiny.toml"


def fake_checkpoint(out_dir: Path, step: int, complete: bool = True) -> Path:
    folder = checkpoint.checkpoint_dir(out_dir) / checkpoint.tag_of(step)
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"")
    if complete:
        (folder / checkpoint.STATE).write_text(json.dumps({"step": step}))
    return folder


def test_latest_tag(tmp_path: Path) -> None:
    assert checkpoint.latest_tag(tmp_path) is None
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 8, complete=False)  # a save that crashed before its state was written
    pointer = tmp_path / "checkpoints/latest"
    pointer.write_text("step00000004\n")
    assert checkpoint.latest_tag(tmp_path) == "step00000004"
    for bad in ("step00000008", "../../etc", "step4"):
        pointer.write_text(bad)
        with pytest.raises(ValueError, match="not a complete checkpoint"):
            checkpoint.latest_tag(tmp_path)


def test_prune_keeps_the_newest_complete_ones_and_the_latest(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 10, complete=False)  # partial, newer than latest: abandoned
    ckpt = checkpoint.checkpoint_dir(tmp_path)
    (ckpt / "latest").write_text("step00000008\n")
    assert checkpoint.prune(ckpt, 0) == []  # 0 keeps everything
    assert checkpoint.prune(ckpt, 2) == ["step00000002", "step00000004", "step00000010"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step00000006", "step00000008"]


def test_rng_states_round_trip_through_json_and_safetensors(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    tensors, meta = checkpoint.rng_state()
    safetensors.torch.save_file(tensors, str(tmp_path / "rng.safetensors"))
    (tmp_path / "rng.json").write_text(json.dumps(meta))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    checkpoint.set_rng_state(
        safetensors.torch.load_file(str(tmp_path / "rng.safetensors")), json.loads((tmp_path / "rng.json").read_text())
    )
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])


def test_check_out_dir(tmp_path: Path) -> None:
    cfg: TrainConfig = load_config(str(TINY), [f"run.out_dir={tmp_path}"])
    checkpoint.check_out_dir(cfg)  # empty: fine
    fake_checkpoint(tmp_path, 2)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        checkpoint.check_out_dir(cfg)
    cfg.run.resume = True
    checkpoint.check_out_dir(cfg)


def test_load_pretrained_refuses_what_is_not_an_export(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a momrec export"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "bert"}))
    with pytest.raises(ValueError, match="not a momrec export"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a momrec export"):
        load_pretrained(tmp_path)


def test_load_pretrained_refuses_weights_that_do_not_fit(folders, tmp_path: Path) -> None:
    from pretrain.model import Catalog, Recommender

    cfg = load_config(str(TINY), [f"data.domains={json.dumps(folders)}"])
    catalog = Catalog.from_folders(folders)
    model = Recommender(cfg.model, cfg.loss, catalog, image_size=cfg.data.stream.image_size)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    doc = {"format": "momrec-pretrained", "version": 1, "config": to_dict(cfg), "catalog": catalog.to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(doc))
    safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"))
    loaded, _, _ = load_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())

    state.pop("user.position.weight")
    state["extra"] = torch.zeros(1)
    safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['user.position.weight'\], unexpected \['extra'\]"):
        load_pretrained(tmp_path)
