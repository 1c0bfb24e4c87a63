"""Model variants through the serving files (built in-process from the tiny export's config): item-ID embeddings
with the history readout and MISSRec interest memory serve their own ranking; what cannot be served exactly (score
fusion, half-clustered interests, an ID model on a domain it has no rows for) and what is not a model are clear
errors that write nothing; a failing dynamo export falls back to the TorchScript exporter."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from pretrain.catalog import encode_catalog_content
from pretrain.export import load_pretrained, new_model
from serve import tower as tower_module
from serve.__main__ import main
from serve.build import ServeOptions, write_serving
from serve.models import ServedModel
from tests.serve.parity import items_json, rank_both
from tests.serve.test_serve_parity import assert_parity

LEGACY = ServeOptions(exporter="legacy", check_users=8)


def variant(pretrained: Path, tmp_path: Path, **user: object) -> ServedModel:
    """A fresh model of the export's config with ``model.user`` fields replaced (random weights, seeded)."""
    _, cfg, catalog = load_pretrained(pretrained)
    model_cfg = dataclasses.replace(cfg.model, user=dataclasses.replace(cfg.model.user, **user))
    cfg = dataclasses.replace(cfg, model=model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = new_model(cfg, catalog).eval()
    (tmp_path / "model").mkdir(exist_ok=True)
    return ServedModel(model, cfg, catalog, "pretrained", tmp_path / "model")


def test_id_embeddings_and_the_history_readout_serve_their_ranking(pretrained, domains, tmp_path: Path) -> None:
    served = variant(pretrained, tmp_path, id_embeddings=True, readout="history")
    with torch.no_grad():
        served.model.user.history.gate.fill_(0.7)  # away from its start (the user = its last item)
    books = domains["source"][0]
    write_serving(served, [books], tmp_path / "out", LEGACY)
    assert_parity(rank_both(served.model, served.cfg, books, tmp_path / "out/books"))


def test_missrec_interest_memory_serves_its_ranking(pretrained, domains, tmp_path: Path) -> None:
    served = variant(pretrained, tmp_path, interest_tokens=4)
    books, movies = domains["source"]
    items = encode_catalog_content(served.model, books, 0, served.cfg.data.stream).items
    served.model.refresh_interests(items)  # books clustered; movies not (no memory there, as in evaluation)
    write_serving(served, [books, movies], tmp_path / "out", LEGACY)
    assert items_json(tmp_path / "out/books")["user_tower"]["interest_memory"]
    assert not items_json(tmp_path / "out/movies")["user_tower"]["interest_memory"]
    for data in (books, movies):
        assert_parity(rank_both(served.model, served.cfg, data, tmp_path / "out" / Path(data).name))

    served.model.prototype_of[3] = -1  # one book without an interest: evaluation's memory depends on the batch
    with pytest.raises(ValueError, match="only 39 of the domain's 40 items have a MISSRec interest prototype"):
        write_serving(served, [books], tmp_path / "half", LEGACY)
    assert not (tmp_path / "half").exists()


def test_score_fusion_is_refused(pretrained, domains, tmp_path: Path) -> None:
    served = variant(pretrained, tmp_path)
    _, cfg, catalog = load_pretrained(pretrained)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fusion=dataclasses.replace(
        cfg.model.fusion, kind="score")))  # fmt: skip
    served = ServedModel(new_model(cfg, catalog).eval(), cfg, catalog, "pretrained", served.folder)
    with pytest.raises(ValueError, match=r"'score' \(score fusion\) .* not an inner product"):
        write_serving(served, domains["source"][:1], tmp_path / "out", LEGACY)
    assert not (tmp_path / "out").exists()


def test_an_id_model_on_a_domain_without_rows_is_refused(pretrained, domains, tmp_path: Path) -> None:
    served = variant(pretrained, tmp_path, id_embeddings=True)
    with pytest.raises(ValueError, match="finetune on that domain first"):
        write_serving(served, domains["target"], tmp_path / "out", LEGACY)


def test_a_folder_that_is_not_a_model_is_one_error_line(domains, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "out")
    assert main(["--model", domains["source"][0], "--data", domains["source"][0], "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model ") and "not a momrec model folder" in err and err.count("\n") == 1
    assert "as a pretrained export" in err and "as a finetuned model" in err
    assert main(["--model", str(tmp_path / "nowhere"), "--data", domains["source"][0], "--out", out]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not Path(out).exists()


def test_an_existing_folder_that_is_no_serve_output_is_not_replaced(pretrained, domains, tmp_path: Path, capsys):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep/notes.txt").write_text("mine")
    args = ["--model", str(pretrained), "--data", domains["source"][0], "--out", str(tmp_path / "keep")]
    assert main(args) == 2
    assert "is not an output of python -m serve" in capsys.readouterr().err
    assert (tmp_path / "keep/notes.txt").read_text() == "mine"


def test_a_failing_dynamo_export_falls_back_to_the_torchscript_exporter(
    pretrained, domains, tmp_path: Path, monkeypatch, caplog
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("unsupported construct\nmore detail")

    monkeypatch.setattr(tower_module, "_export_dynamo", broken)
    served = variant(pretrained, tmp_path)
    caplog.set_level(logging.WARNING, logger="serve.tower")
    write_serving(served, domains["source"][:1], tmp_path / "out", ServeOptions(exporter="dynamo", check_users=8))
    info = items_json(tmp_path / "out/books")
    assert info["user_tower"]["exporter"] == "legacy" and info["user_tower"]["check"]["max_abs_diff"] < 1e-5
    assert "failed (RuntimeError: unsupported construct); using the TorchScript exporter" in caplog.text
