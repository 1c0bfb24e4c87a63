"""The export in the Hugging Face layout: ``Recommender.save_pretrained`` / ``from_pretrained`` and the engine's
exporter write one layout (config.json with the architecture at the top, model.safetensors, a model card), it reads
back bit-identical, and version 1 exports (written by hand here exactly as the old exporter did) still load."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

import pretrain.export
from pretrain import hub
from pretrain.config import TrainConfig, load_config, to_dict
from pretrain.export import load_pretrained, new_model
from pretrain.model import Catalog, Recommender
from shards.stream import SequenceStream
from tests.testutil import TINY


def tiny_config(folders: list[str], out_dir: Path) -> TrainConfig:
    more = [f"data.domains={json.dumps(folders)}", "data.stream.num_workers=0", f"run.out_dir={out_dir}"]
    return load_config(str(TINY), more)


@pytest.fixture(scope="module")
def tiny(folders, tmp_path_factory) -> tuple[TrainConfig, Recommender, object]:
    cfg = tiny_config(folders, tmp_path_factory.mktemp("run"))
    torch.manual_seed(0)
    model = new_model(cfg, Catalog.from_folders(folders)).eval()
    with torch.no_grad():  # make the weights differ from a fresh build with the same seed
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.prototype_of.fill_(1)  # a buffer that must travel too
    return cfg, model, next(iter(SequenceStream(cfg.data.domains, cfg.data.stream)))


@torch.no_grad()
def scores(model: Recommender, batch) -> torch.Tensor:
    items = model.encode_items(batch)
    return model.score(model.user_vectors(batch, items), items)


def assert_same(a: Recommender, b: Recommender, batch) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    assert torch.equal(scores(a, batch), scores(b, batch))


def test_save_pretrained_then_from_pretrained_is_bit_identical(tiny, tmp_path: Path) -> None:
    cfg, model, batch = tiny
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = Recommender.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, Recommender) and not loaded.training
    assert_same(model, loaded, batch)
    again, cfg2, catalog = load_pretrained(tmp_path / "m")
    assert to_dict(cfg2) == to_dict(cfg) and catalog == model.catalog
    assert_same(model, again, batch)


def test_config_json_is_readable_and_sectioned(tiny, tmp_path: Path) -> None:
    cfg, model, _ = tiny
    model.save_pretrained(tmp_path / "m")
    text = (tmp_path / "m/config.json").read_text()
    doc = json.loads(text)
    assert list(doc) == ["format", "version", "architectures", "model", "loss", "image_size", "config", "catalog"]
    assert (doc["format"], doc["version"], doc["architectures"]) == ("momrec-pretrained", 2, ["Recommender"])
    assert doc["model"] == to_dict(cfg.model) and doc["loss"] == to_dict(cfg.loss)
    assert doc["image_size"] == cfg.data.stream.image_size == doc["config"]["data"]["stream"]["image_size"]
    assert set(doc["config"]) == {"data", "optim", "engine", "run"}
    assert doc["catalog"] == model.catalog.to_dict()
    assert '"user": {' in text and text.count("\n") < 400  # indented, the popularity lists one line per domain


def test_model_card_names_data_config_parameters_and_loading(tiny, tmp_path: Path) -> None:
    cfg, model, _ = tiny
    model.save_pretrained(tmp_path / "m")
    card = (tmp_path / "m/README.md").read_text()
    assert card.startswith("---\nlibrary_name: momrec\n")
    for domain, n in zip(model.catalog.domains, model.catalog.n_items, strict=True):
        assert f"| {domain} | {n:,} |" in card
    total = sum(p.numel() for p in model.parameters())
    assert f"| all | {total:,} | {total:,} |" in card
    assert f"width {cfg.model.user.width}, {cfg.model.user.layers} layers" in card
    assert f'Recommender.from_pretrained("{tmp_path / "m"}")' in card and "load_pretrained(" in card
    assert "No validation had been logged" in card


def test_the_engine_export_is_the_same_layout_with_the_last_validation(tiny, tmp_path: Path) -> None:
    cfg, model, batch = tiny
    out = Path(cfg.run.out_dir)
    rows = [{"step": 4, "valid/ndcg@10": 0.25, "valid/hr@10": 0.5}, {"step": 6, "loss/total": 1.0}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    engine = SimpleNamespace(module=model, zero_optimization_stage=lambda: 0)
    folder = pretrain.export.export(engine, cfg, model.catalog, tmp_path / "model")
    card = (folder / "README.md").read_text()
    assert "(step 4)" in card and "| valid/ndcg@10 | 0.2500 |" in card and "| valid/hr@10 | 0.5000 |" in card
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((folder / "config.json").read_text()) == json.loads((tmp_path / "saved/config.json").read_text())
    assert_same(model, Recommender.from_pretrained(folder), batch)


def write_version_1(model: Recommender, cfg: TrainConfig, folder: Path) -> Path:
    """A folder exactly as the version 1 exporter wrote it (its code, inlined)."""
    folder.mkdir()
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    doc = {"format": "momrec-pretrained", "version": 1, "config": to_dict(cfg), "catalog": model.catalog.to_dict()}
    safetensors.torch.save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return folder


def test_a_version_1_export_still_loads_and_converts(tiny, tmp_path: Path) -> None:
    cfg, model, batch = tiny
    old = write_version_1(model, cfg, tmp_path / "v1")
    loaded, cfg1, catalog = load_pretrained(old)
    assert to_dict(cfg1) == to_dict(cfg) and catalog == model.catalog
    assert_same(model, loaded, batch)
    assert_same(model, Recommender.from_pretrained(old), batch)
    loaded.save_pretrained(tmp_path / "v2")  # the conversion: load, save
    assert json.loads((tmp_path / "v2/config.json").read_text())["version"] == 2
    assert_same(model, load_pretrained(tmp_path / "v2")[0], batch)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"format": "momrec-pretrained", "version": 3}, r"format version 3, this momrec reads \[1, 2\]: re-export"),
        ({"format": "momrec-pretrained"}, r"format version None, this momrec reads \[1, 2\]"),
        (
            {"format": "momrec-pretrained", "version": 1, "catalog": {}},
            r"a version 1 momrec export without \['config'\]",
        ),
        ({"format": "momrec-pretrained", "version": 2, "model": {}}, r"without \['loss', 'image_size', 'catalog'\]"),
        ({"architectures": ["BertModel"], "model_type": "bert"}, r"not a momrec export \(format None"),
    ],
)
def test_unreadable_exports_are_one_line_errors(tmp_path: Path, doc: dict, message: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(doc))
    for load in (load_pretrained, Recommender.from_pretrained):
        with pytest.raises(ValueError, match=message) as info:
            load(tmp_path)
        assert "\n" not in str(info.value)


def test_weights_that_do_not_fit_are_named(tiny, tmp_path: Path) -> None:
    _, model, _ = tiny
    model.save_pretrained(tmp_path / "m")
    state = safetensors.torch.load_file(str(tmp_path / "m/model.safetensors"))
    state["extra"] = state.pop("user.norm.weight")
    safetensors.torch.save_file(state, str(tmp_path / "m/model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['user.norm.weight'\], unexpected \['extra'\]"):
        Recommender.from_pretrained(tmp_path / "m")


def test_a_recommender_built_by_hand_saves_without_a_training_config(tiny, tmp_path: Path) -> None:
    cfg, model, batch = tiny
    bare = Recommender(cfg.model, cfg.loss, model.catalog, image_size=cfg.data.stream.image_size)
    bare.load_state_dict(model.state_dict())
    bare.save_pretrained(tmp_path / "bare")
    doc = hub.read_document(tmp_path / "bare")
    assert "config" not in doc and "not recorded" in (tmp_path / "bare/README.md").read_text()
    loaded, cfg2, _ = load_pretrained(tmp_path / "bare")
    assert to_dict(cfg2.model) == to_dict(cfg.model) and cfg2.data.stream.image_size == cfg.data.stream.image_size
    assert_same(model, loaded, batch)
