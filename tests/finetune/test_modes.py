"""Finetuning modes without the engine: what each mode trains (per part, LoRA layers matched), the pretrained
weights actually loaded (and --from none not), save + reload to identical scores, LoRA targets per architecture."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from finetune.export import WEIGHTS, load_finetuned, save_finetuned, saved_tensors
from finetune.modes import PARTS, part_of
from finetune.run import resolve_config
from finetune.transfer import CATALOG_DEPENDENT, Source, prepare_model, transfer_weights
from pretrain.config import TrainConfig
from pretrain.model import Catalog, Recommender
from pretrain.optim import param_groups
from shards.stream import SequenceStream

TINY = Path(__file__).resolve().parents[2] / "launch/configs/tiny.toml"


def resolved(pretrained: Path | str, domains: dict, mode: str, *more: str) -> TrainConfig:
    return resolve_config(str(pretrained), domains["target"], mode, [], ["finetune.top_layers=1", *more])


def scratch_config(pretrained: Path, domains: dict, mode: str, *more: str) -> TrainConfig:
    """--from none with the pretraining run's resolved config: the same architecture, nothing loaded."""
    return resolve_config("none", domains["target"], mode, [pretrained.parent / "config.json"], list(more))


def prepared(cfg: TrainConfig):
    source = None if cfg.finetune.from_path == "none" else Source.open(cfg.finetune.from_path)
    return prepare_model(cfg, Catalog.from_folders(cfg.data.domains), source)


def first_batch(cfg: TrainConfig):
    return next(iter(SequenceStream(cfg.data.domains, cfg.data.stream)))


@torch.no_grad()
def scores(model: Recommender, batch) -> torch.Tensor:
    items = model.encode_items(batch)
    return model.score(model.user_vectors(batch, items), items)


def train_step(model: Recommender, batch) -> None:
    model.train()
    model(batch).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.eval()


def trainable(model: torch.nn.Module) -> dict[str, list[str]]:
    """part -> trainable parameter names."""
    out: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out.setdefault(part_of(name), []).append(name)
    return out


def fully_trainable(model: torch.nn.Module, part: str) -> bool:
    return all(p.requires_grad for n, p in model.named_parameters() if part_of(n) == part)


# ---- what each mode trains ------------------------------------------------------------------------------------


def test_full_trains_everything(pretrained, domains) -> None:
    model, prep = prepared(resolved(pretrained, domains, "full"))
    assert all(p.requires_grad for p in model.parameters())
    assert prep.params["all"]["trainable"] == prep.params["all"]["total"] == sum(p.numel() for p in model.parameters())
    assert prep.lora == {}


def test_adapter_trains_the_heads_only(pretrained, domains) -> None:
    model, prep = prepared(resolved(pretrained, domains, "adapter"))
    assert set(trainable(model)) == {"text.head", "image.head"}  # sum fusion has no parameters
    assert fully_trainable(model, "text.head") and fully_trainable(model, "image.head")
    heads = prep.params["text.head"]["total"] + prep.params["image.head"]["total"]
    assert prep.params["all"]["trainable"] == heads and prep.params["user"]["trainable"] == 0


def test_frozen_trains_everything_outside_the_backbones(pretrained, domains) -> None:
    model, prep = prepared(resolved(pretrained, domains, "frozen"))
    assert set(trainable(model)) == {"text.head", "image.head", "user"}  # sum fusion has no parameters
    assert all(fully_trainable(model, p) for p in ("text.head", "image.head", "user"))
    assert prep.params["text.backbone"]["trainable"] == prep.params["image.backbone"]["trainable"] == 0
    assert prep.params["user"]["trainable"] == prep.params["user"]["total"] > 0


def test_top_trains_the_last_blocks_and_what_is_outside_the_backbones(pretrained, domains) -> None:
    model, prep = prepared(resolved(pretrained, domains, "top"))
    names = trainable(model)
    assert names["text.backbone"] and names["image.backbone"]
    assert all(n.startswith("text.backbone.model.encoder.layer.1.") for n in names["text.backbone"])
    assert all(n.startswith("image.backbone.model.encoder.stages.1.") for n in names["image.backbone"])
    assert all(fully_trainable(model, p) for p in ("text.head", "image.head", "user"))
    assert 0 < prep.params["text.backbone"]["trainable"] < prep.params["text.backbone"]["total"]


def test_lora_adapts_the_attention_and_trains_the_heads(pretrained, domains) -> None:
    model, prep = prepared(resolved(pretrained, domains, "lora"))
    layers = range(2)
    assert prep.lora == {
        "text": [f"encoder.layer.{i}.attention.self.{t}" for i in layers for t in ("query", "value")],
        "image": [],  # ResNet: no attention, no LoRA by default
        "user": [f"blocks.{i}.attn.{t}_proj" for i in layers for t in "qkvo"],
    }
    names = trainable(model)
    for part in ("text.backbone", "user"):
        assert names[part] and all(".lora_A." in n or ".lora_B." in n for n in names[part]), part
    assert "image.backbone" not in names
    assert fully_trainable(model, "image.head") and fully_trainable(model, "text.head")
    rank, width = 8, 32
    assert prep.params["text.backbone"]["trainable"] == 4 * 2 * rank * width  # 4 layers, A (r x 32) + B (32 x r)
    assert prep.params["user"]["trainable"] == 8 * 2 * rank * width
    # LoRA weights are new: a small encoder_lr (meant for pretrained backbone weights) must not starve them
    cfg = resolved(pretrained, domains, "lora", "optim.encoder_lr=1e-6", "optim.lr=1e-3")
    model, _ = prepared(cfg)
    lr_of = {id(p): g["lr"] for g in param_groups(model, cfg.optim) for p in g["params"]}
    lora = [p for n, p in model.named_parameters() if ".lora_" in n]
    assert lora and all(lr_of[id(p)] == 1e-3 for p in lora)


def test_lora_in_the_top_blocks_leaves_a_frozen_bottom_to_cache(pretrained, domains) -> None:
    cfg = resolved(pretrained, domains, "lora", "finetune.lora_top_layers=1", "model.text.cache_frozen=true")
    model, prep = prepared(cfg)
    assert prep.lora["text"] == ["encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.value"]
    assert prep.lora["user"] == [f"blocks.{i}.attn.{t}_proj" for i in range(2) for t in "qkvo"]  # all of it
    backbone = model.text.backbone
    assert backbone.frozen_split() == len(backbone.stages()) - 1  # stem and block 0 frozen: the cached bottom
    batch = first_batch(cfg)
    train_step(model, batch)
    cached = len(backbone.cache)
    assert cached > 0 and backbone.cache.misses == cached
    train_step(model, batch)  # the same items again: bottom outputs from the cache, only block 1 runs
    assert len(backbone.cache) == cached and backbone.cache.hits >= cached
    with pytest.raises(ValueError, match=r"finetune\.lora_top_layers \(3\) exceeds the 2 blocks of the text"):
        prepared(resolved(pretrained, domains, "lora", "finetune.lora_top_layers=3"))


def test_fresh_id_embeddings_train_in_any_mode(pretrained, domains) -> None:
    model, prep = prepared(resolved(pretrained, domains, "adapter", "finetune.id_embeddings=true"))
    assert model.ids is not None and model.ids.weight.shape == (40, 32) and model.ids.weight.requires_grad
    assert "ids.weight" in prep.transfer.fresh and set(trainable(model)) == {"text.head", "image.head", "ids"}
    assert list(prep.params) == [p for p in PARTS if p != "fusion"] + ["all"]


# ---- the pretrained weights --------------------------------------------------------------------------------------


def test_pretrained_weights_are_loaded_except_the_catalog_dependent(pretrained, domains) -> None:
    state = safetensors.torch.load_file(str(pretrained / "model.safetensors"))
    model, prep = prepared(resolved(pretrained, domains, "top"))
    own = model.state_dict()
    assert prep.transfer.skipped == ["interests", "prototype_of"]
    assert len(prep.transfer.loaded) == len(own) - 2
    for name in prep.transfer.loaded:
        assert torch.equal(own[name], state[name]), name
    assert own["prototype_of"].shape == (40,)  # the target catalog's, not the two source domains' 80 rows


def test_from_none_is_the_same_architecture_not_pretrained(pretrained, domains) -> None:
    state = safetensors.torch.load_file(str(pretrained / "model.safetensors"))
    model, prep = prepared(scratch_config(pretrained, domains, "full"))
    assert prep.source is None and prep.transfer is None
    own = model.state_dict()
    assert {k: v.shape for k, v in own.items() if k not in CATALOG_DEPENDENT} == {
        k: v.shape for k, v in state.items() if k not in CATALOG_DEPENDENT
    }
    differ = [k for k in own if k not in CATALOG_DEPENDENT and not torch.equal(own[k], state[k])]
    assert any(k.startswith("user.") for k in differ) and any(k.startswith("text.") for k in differ)


def test_fresh_parts_keep_the_controls_initialisation(pretrained, domains) -> None:
    state = safetensors.torch.load_file(str(pretrained / "model.safetensors"))
    torch.manual_seed(0)
    model, prep = prepared(resolved(pretrained, domains, "frozen", "finetune.fresh=['user.norm', 'text.proj']"))
    torch.manual_seed(0)
    control, _ = prepared(scratch_config(pretrained, domains, "frozen"))
    own, init = model.state_dict(), control.state_dict()
    fresh = [k for k in own if k.startswith(("user.norm.", "text.proj."))]
    assert fresh and set(fresh) <= set(prep.transfer.fresh) and set(fresh) <= set(prep.transfer.skipped)
    for name in fresh:
        assert torch.equal(own[name], init[name]) and not torch.equal(own[name], state[name]), name
    assert not set(fresh) & set(prep.transfer.loaded)
    for name in prep.transfer.loaded:
        assert torch.equal(own[name], state[name]), name


def test_a_fresh_prefix_that_names_nothing_is_an_error(pretrained, domains) -> None:
    with pytest.raises(ValueError, match=r"finetune.fresh: \['user.nrom'\] name no tensor"):
        prepared(resolved(pretrained, domains, "frozen", "finetune.fresh=['user.nrom']"))


def test_fresh_frozen_parts_are_saved_and_reloaded(pretrained, domains, tmp_path: Path) -> None:
    cfg = resolved(pretrained, domains, "adapter", "finetune.fresh=['user.blocks.0']")  # the user encoder is frozen
    model, prep = prepared(cfg)
    batch = first_batch(cfg)
    train_step(model, batch)
    folder = save_finetuned(model, cfg, Catalog.from_folders(cfg.data.domains), prep.source, tmp_path / "ft")
    saved = set(safetensors.torch.load_file(str(folder / WEIGHTS)))
    assert {k for k in model.state_dict() if k.startswith("user.blocks.0.")} <= saved
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)  # a different fresh draw on reload must not matter: the saved tensors win
        reloaded, _, _ = load_finetuned(folder)
    assert torch.equal(scores(reloaded, batch), scores(model, batch))


def test_a_changed_architecture_is_refused_naming_the_tensors(pretrained, domains) -> None:
    cfg = resolved(pretrained, domains, "full")
    wider = dataclasses.replace(cfg.model, user=dataclasses.replace(cfg.model.user, layers=3))
    model = Recommender(wider, cfg.loss, Catalog.from_folders(domains["target"]), image_size=32)
    with pytest.raises(ValueError, match=r"missing \['user\.blocks\.2\."):
        transfer_weights(model, Source.open(pretrained).weights())


# ---- save and reload ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "lora", "adapter", "frozen", "top"])
def test_save_and_reload_give_identical_scores(pretrained, domains, tmp_path: Path, mode: str) -> None:
    cfg = resolved(pretrained, domains, mode, "finetune.lora_dropout=0.1")
    model, prep = prepared(cfg)
    batch = first_batch(cfg)
    before = scores(model, batch)
    train_step(model, batch)
    expected = scores(model, batch)
    assert not torch.equal(before, expected)
    folder = save_finetuned(model, cfg, Catalog.from_folders(cfg.data.domains), prep.source, tmp_path / "ft")

    saved = set(saved_tensors(folder))  # by the model's names (a LoRA folder's file has PEFT's: test_peft_folder.py)
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if p.requires_grad} <= saved
    assert all(params[n].requires_grad for n in saved if n in params)  # only trained parameters, plus buffers
    doc = json.loads((folder / "finetuned.json").read_text())
    assert doc["pretrained"]["sha256"] == Source.open(pretrained).sha256 and doc["config"]["finetune"]["mode"] == mode

    exact, _, catalog = load_finetuned(folder, merge=False)
    assert catalog == Catalog.from_folders(domains["target"])
    assert torch.equal(scores(exact, batch), expected)
    merged, _, _ = load_finetuned(folder)
    torch.testing.assert_close(scores(merged, batch), expected, atol=1e-5, rtol=1e-5)
    plain = Recommender(cfg.model, cfg.loss, catalog, image_size=32)
    assert set(merged.state_dict()) == set(plain.state_dict())  # LoRA folded into the weights


def test_from_none_saves_everything_and_reloads(pretrained, domains, tmp_path: Path) -> None:
    cfg = scratch_config(pretrained, domains, "adapter")
    model, prep = prepared(cfg)
    batch = first_batch(cfg)
    train_step(model, batch)
    folder = save_finetuned(model, cfg, Catalog.from_folders(cfg.data.domains), None, tmp_path / "ft")
    assert set(safetensors.torch.load_file(str(folder / WEIGHTS))) == set(model.state_dict())
    reloaded, _, _ = load_finetuned(folder)
    assert torch.equal(scores(reloaded, batch), scores(model, batch))


def test_reload_checks_the_pretrained_weights_hash(pretrained, domains, tmp_path: Path) -> None:
    copy = tmp_path / "pretrained"
    shutil.copytree(pretrained, copy)
    cfg = resolved(copy, domains, "adapter")
    model, prep = prepared(cfg)
    folder = save_finetuned(model, cfg, Catalog.from_folders(cfg.data.domains), prep.source, tmp_path / "ft")
    moved = tmp_path / "moved"
    copy.rename(moved)
    with pytest.raises(ValueError, match="does not exist"):
        load_finetuned(folder)
    load_finetuned(folder, pretrained=moved)  # the same weights elsewhere
    state = safetensors.torch.load_file(str(moved / "model.safetensors"))
    state["user.norm.weight"] += 1
    safetensors.torch.save_file(state, str(moved / "model.safetensors"))
    with pytest.raises(ValueError, match="not the export this model was finetuned from"):
        load_finetuned(folder, pretrained=moved)


# ---- LoRA targets ---------------------------------------------------------------------------------------------


def test_a_lora_target_that_matches_nothing_is_an_error(pretrained, domains) -> None:
    with pytest.raises(ValueError, match=r"finetune\.lora_text_targets: 'quey' matches no .* \['dense', 'key'"):
        prepared(resolved(pretrained, domains, "lora", "finetune.lora_text_targets=query,quey"))


def test_lora_on_conv_layers_when_named(pretrained, domains) -> None:
    model, prep = prepared(resolved(pretrained, domains, "lora", "finetune.lora_image_targets=convolution"))
    assert len(prep.lora["image"]) == 6 and all(n.endswith("convolution") for n in prep.lora["image"])
    names = trainable(model)["image.backbone"]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)


VIT = ["model.image.architecture=vit", "model.image.config_overrides={hidden_size = 16, num_hidden_layers = 1, "
       "num_attention_heads = 2, intermediate_size = 37, patch_size = 8}"]  # fmt: skip
CONVNEXT = ["model.image.architecture=convnext", "model.image.config_overrides={hidden_sizes = [8, 16], "
            "depths = [1, 1], num_stages = 2}"]  # fmt: skip


@pytest.mark.parametrize(("image", "adapted"), [(VIT, ["layers.0.attention.q_proj", "layers.0.attention.v_proj"]),
                                                (CONVNEXT, [])], ids=["vit", "convnext"])  # fmt: skip
def test_lora_defaults_per_image_architecture(domains, image: list[str], adapted: list[str]) -> None:
    cfg = resolve_config("none", domains["target"], "lora", [TINY], image)
    model, prep = prepared(cfg)
    assert prep.lora["image"] == adapted
    assert bool(trainable(model).get("image.backbone")) == bool(adapted)
    assert torch.isfinite(scores(model, first_batch(cfg))).all()
