"""A LoRA-finetuned folder is PEFT's own: ``PeftModel.from_pretrained(base, folder)`` loads it onto the pretrained
Recommender rebuilt on the target catalog and scores as the trained model and ``load_finetuned`` do; merging (PEFT's
``merge_and_unload``) changes scores by float rounding only; version 1 folders still load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper

from finetune.export import WEIGHTS, base_model, load_finetuned, save_finetuned, saved_names
from finetune.run import resolve_config
from finetune.transfer import Source, prepare_model
from pretrain.config import TrainConfig
from pretrain.configlib import to_dict
from pretrain.model import Catalog, Recommender
from shards.stream import SequenceStream


def resolved(pretrained: Path, domains: dict, *more: str) -> TrainConfig:
    """The LoRA config; no frozen-feature cache, so every model here computes its features afresh and scores can be
    compared bit for bit (a cached feature, computed in another batch, may differ in the last bit)."""
    fresh = ["model.text.cache_frozen=false", "model.image.cache_frozen=false"]
    return resolve_config(str(pretrained), domains["target"], "lora", [], ["finetune.lora_dropout=0.1", *fresh, *more])


@torch.no_grad()
def scores(model: torch.nn.Module, batch) -> torch.Tensor:
    items = model.encode_items(batch)
    return model.score(model.user_vectors(batch, items), items)


def trained(cfg: TrainConfig):
    """The LoRA model after one SGD step, its source and a batch."""
    source = Source.open(cfg.finetune.from_path)
    model, _ = prepare_model(cfg, Catalog.from_folders(cfg.data.domains), source)
    batch = next(iter(SequenceStream(cfg.data.domains, cfg.data.stream)))
    model.train()
    model(batch).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    return model.eval(), source, batch


@pytest.fixture(scope="module")
def saved(pretrained, domains, tmp_path_factory):
    """(folder, cfg, source, batch, the trained model's scores, its LoRA layers) of a LoRA run with fresh item IDs."""
    cfg = resolved(pretrained, domains, "finetune.id_embeddings=true")
    model, source, batch = trained(cfg)
    folder = save_finetuned(model, cfg, model.catalog, source, tmp_path_factory.mktemp("ft") / "model")
    layers = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))
    return folder, cfg, source, batch, scores(model, batch), layers


def test_the_folder_has_peft_files_and_names(saved) -> None:
    folder, cfg, source, _, _, layers = saved
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "finetuned.json"]  # fmt: skip
    config = json.loads((folder / "adapter_config.json").read_text())
    assert len(layers) == 12  # query and value of 2 text layers, q/k/v/o of 2 user blocks
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == layers
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16.0, 0.1)
    assert config["base_model_name_or_path"] == source.path
    assert {"ids", "text.proj", "image.proj"} <= set(config["modules_to_save"])
    keys = set(safetensors.torch.load_file(str(folder / WEIGHTS)))
    assert all(k.startswith("base_model.model.") and ".default" not in k for k in keys)
    assert {f"base_model.model.{n}.lora_{ab}.weight" for n in layers for ab in "AB"} <= keys
    assert {"base_model.model.ids.weight", "base_model.model.prototype_of"} <= keys
    doc = json.loads((folder / "finetuned.json").read_text())
    assert (doc["version"], doc["layout"], doc["modules_to_save"]) == (2, "peft", config["modules_to_save"])


def test_peft_from_pretrained_scores_as_the_trained_model_and_load_finetuned(saved) -> None:
    folder, cfg, source, batch, expected, layers = saved
    catalog = Catalog.from_folders(cfg.data.domains)
    peft_model = PeftModel.from_pretrained(base_model(cfg, catalog, source), str(folder))
    assert sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if isinstance(m, LoraLayer)) == layers  # fmt: skip
    assert any(isinstance(m, ModulesToSaveWrapper) for m in peft_model.modules())
    by_peft_BC = scores(peft_model, batch)
    torch.testing.assert_close(by_peft_BC, expected, atol=1e-6, rtol=0)  # the trained model, up to float rounding
    exact, _, _ = load_finetuned(folder, merge=False)
    assert torch.equal(scores(exact, batch), by_peft_BC)  # the same weights, loaded two ways: bit for bit

    merged, _, _ = load_finetuned(folder)  # PEFT's merge_and_unload
    assert type(merged) is Recommender and not merged.training
    assert not any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in merged.modules())
    assert set(merged.state_dict()) == set(Recommender(cfg.model, cfg.loss, catalog, image_size=32).state_dict())
    torch.testing.assert_close(scores(merged, batch), expected, atol=1e-5, rtol=1e-5)
    by_peft = peft_model.merge_and_unload()
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in by_peft.state_dict().items())


def test_a_fresh_lora_base_layer_travels_and_reloads(pretrained, domains, tmp_path: Path) -> None:
    cfg = resolved(pretrained, domains, "finetune.fresh=['user.blocks.0']")  # LoRA layers with fresh base layers
    model, source, batch = trained(cfg)
    folder = save_finetuned(model, cfg, model.catalog, source, tmp_path / "ft")
    keys = set(safetensors.torch.load_file(str(folder / WEIGHTS)))
    assert "base_model.model.user.blocks.0.attn.q_proj.base_layer.weight" in keys
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)  # another fresh draw on reload: the saved tensors win
        peft_model = PeftModel.from_pretrained(base_model(cfg, model.catalog, source), str(folder))
    assert torch.equal(scores(peft_model, batch), scores(model, batch))
    torch.testing.assert_close(scores(load_finetuned(folder)[0], batch), scores(model, batch), atol=1e-5, rtol=1e-5)


def write_version_1(model: Recommender, cfg: TrainConfig, source: Source, folder: Path) -> Path:
    """A folder exactly as the version 1 save_finetuned wrote it (its code, inlined): model names, no PEFT config."""
    from finetune.modes import lora_layers

    folder.mkdir()
    names = saved_names(model, True, cfg.finetune.fresh)
    state = model.state_dict()
    tensors = {k: state[k].detach().cpu().clone().contiguous() for k in names}
    doc = {"format": "momrec-finetuned", "version": 1, "pretrained": source.pointer(), "mode": cfg.finetune.mode}
    doc |= {"lora": lora_layers(model), "tensors": names, "config": to_dict(cfg), "catalog": model.catalog.to_dict()}
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / "finetuned.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return folder


def test_a_version_1_lora_folder_still_loads(pretrained, domains, tmp_path: Path) -> None:
    cfg = resolved(pretrained, domains)
    model, source, batch = trained(cfg)
    old = write_version_1(model, cfg, source, tmp_path / "v1")
    assert torch.equal(scores(load_finetuned(old, merge=False)[0], batch), scores(model, batch))
    torch.testing.assert_close(scores(load_finetuned(old)[0], batch), scores(model, batch), atol=1e-5, rtol=1e-5)


def test_unreadable_folders_are_one_line_errors(saved, tmp_path: Path) -> None:
    folder = saved[0]
    doc = json.loads((folder / "finetuned.json").read_text())
    bad = tmp_path / "v3"
    bad.mkdir()
    (bad / "finetuned.json").write_text(json.dumps({**doc, "version": 3}))
    with pytest.raises(ValueError, match=r"format version 3, this momrec reads \[1, 2\]: finetune again") as info:
        load_finetuned(bad)
    assert "\n" not in str(info.value)

    cut = tmp_path / "cut"
    cut.mkdir()
    for name in ("finetuned.json", "adapter_config.json"):
        (cut / name).write_bytes((folder / name).read_bytes())
    tensors = safetensors.torch.load_file(str(folder / WEIGHTS))
    tensors.pop("base_model.model.ids.weight")
    safetensors.torch.save_file(tensors, str(cut / WEIGHTS))
    for merge in (True, False):
        with pytest.raises(ValueError, match=r"does not fit its config: missing \['base_model.model.ids.weight'\]"):
            load_finetuned(cut, merge=merge)
