"""python -m serve on a pretrained export and on a finetuned model: FAISS search with the ONNX user tower's vectors
(onnxruntime) gives the model's own top-10 and evaluation's target ranks, up to ties; the tower's user vectors equal
the model's; and the files say what they are."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import safetensors.numpy
import torch

from finetune.export import load_finetuned
from pretrain.export import load_pretrained
from serve.__main__ import main
from serve.build import ServeOptions, write_serving
from serve.models import load_model
from tests.serve.parity import TIE, Both, K, items_json, rank_both, served_rank


@pytest.fixture(scope="session")
def served_pretrained(pretrained, domains, tmp_path_factory) -> Path:
    """The command (default exporter: dynamo) on the pretrained export, for a domain of its catalog."""
    out = tmp_path_factory.mktemp("served") / "pretrained"
    started = time.perf_counter()
    assert main(["--model", str(pretrained), "--data", domains["source"][0], "--out", str(out), "--check-users",
                 "8"]) == 0  # fmt: skip
    print(f"python -m serve on the tiny export: {time.perf_counter() - started:.1f} s")
    return out


@pytest.fixture(scope="session")
def served_finetuned(finetuned, domains, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("served") / "finetuned"
    assert main(["--model", str(finetuned), "--data", *domains["target"], "--out", str(out), "--exporter",
                 "legacy"]) == 0  # fmt: skip
    return out


def assert_parity(both: Both) -> None:
    torch.testing.assert_close(both.served_user_BD, both.model_user_BD, atol=1e-5, rtol=0)
    # the served top-10 are items the model scores as its own top-10, position by position (ties may swap)
    model_BC = both.model_scores_BC.double()
    picked_BK = model_BC.gather(1, both.served_top_BK)
    best_BK = model_BC.gather(1, both.model_top_BK)
    torch.testing.assert_close(picked_BK, best_BK, atol=TIE, rtol=0)
    same = (both.served_top_BK == both.model_top_BK).all(1).float().mean()
    assert same >= 0.9, f"only {same:.0%} of the users got the very same top-{K}"
    for b, expected in enumerate(both.eval_ranks):
        rank, near = served_rank(both, b)
        assert abs(rank - expected) <= near, (b, rank, expected, near)


def test_a_pretrained_export_serves_its_own_ranking(pretrained, domains, served_pretrained) -> None:
    model, cfg, _ = load_pretrained(pretrained)
    both = rank_both(model, cfg, domains["source"][0], served_pretrained / "books")
    assert_parity(both)
    assert len(both.eval_ranks) == 30


def test_a_domain_outside_the_catalog_is_served_by_content(pretrained, domains, tmp_path: Path) -> None:
    served = load_model(pretrained)
    write_serving(served, domains["target"], tmp_path / "out", ServeOptions(exporter="legacy", check_users=8))
    assert_parity(rank_both(served.model, served.cfg, domains["target"][0], tmp_path / "out/fashion"))
    assert not items_json(tmp_path / "out/fashion")["in_model_catalog"]


def test_a_finetuned_model_serves_its_own_ranking(finetuned, domains, served_finetuned) -> None:
    model, cfg, _ = load_finetuned(finetuned)
    assert_parity(rank_both(model, cfg, domains["target"][0], served_finetuned / "fashion"))
    info = items_json(served_finetuned / "fashion")
    assert info["model"]["stage"] == "finetuned" and info["user_tower"]["exporter"] == "legacy"


def test_the_files_describe_themselves(pretrained, domains, served_pretrained) -> None:
    doc = json.loads((served_pretrained / "serve.json").read_text())
    assert doc["format"] == "momrec-serve" and list(doc["domains"]) == ["books"]
    assert doc["model"]["stage"] == "pretrained" and doc["model"]["path"] == str(pretrained.resolve())
    info = items_json(served_pretrained / "books")
    tensors = safetensors.numpy.load_file(str(served_pretrained / "books/item_embeddings.safetensors"))
    assert tensors["vectors"].shape == tensors["table"].shape == (40, 32) == (info["n_items"], info["dim"])
    assert abs(float((tensors["vectors"] ** 2).sum(1).min()) - 1) < 1e-5
    assert len(info["ids"]) == 40 and len(set(info["ids"])) == 40
    assert info["metric"] == "inner_product" and info["in_model_catalog"]
    tower = info["user_tower"]
    assert tower["exporter"] == "dynamo" and tower["check"]["users"] == 8 and tower["check"]["max_abs_diff"] < 1e-5
    readme = (served_pretrained / "README.md").read_text()
    assert "faiss.read_index" in readme and "`books/`" in readme
