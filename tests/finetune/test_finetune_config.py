"""finetune.config: finetune's section on top of pretraining's root, its cross-section rule and readiness checks,
and saved configs of either stage loading in both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.__main__ import main
from finetune.config import FinetuneTrainConfig, config_help, from_dict, load_config
from finetune.run import resolve_config
from pretrain import config as pretrain_config
from pretrain.configlib import all_keys, to_dict

TINY = Path(__file__).resolve().parents[2] / "launch/configs/tiny.toml"


def test_the_finetune_root_is_pretrainings_plus_its_section() -> None:
    cfg = load_config(TINY, ["finetune.mode=lora", "finetune.fresh=['user.history']"])
    assert isinstance(cfg, pretrain_config.TrainConfig) and cfg.finetune.fresh == ["user.history"]
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg
    pretraining = to_dict(cfg)
    del pretraining["finetune"]
    assert pretraining == to_dict(pretrain_config.load_config(TINY))
    assert set(all_keys(FinetuneTrainConfig)) - set(all_keys(pretrain_config.TrainConfig)) == {
        "finetune",
        *(f"finetune.{k}" for k in all_keys(type(cfg.finetune))),
    }


def test_saved_configs_of_either_stage_load_in_both(tmp_path: Path) -> None:
    finetuned = to_dict(load_config(TINY, ["finetune.mode=top"]))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(finetuned), encoding="utf-8")
    assert load_config(path).finetune.mode == "top"  # finetune keeps its section
    assert "finetune" not in to_dict(pretrain_config.load_config(path))  # pretraining reads past it
    assert from_dict(to_dict(pretrain_config.load_config(TINY))).finetune == FinetuneTrainConfig().finetune


def test_finetune_rules_live_in_the_config() -> None:
    with pytest.raises(ValueError, match=r"loss\.content_id \(0\.1, from the pretrained run.*finetune\.id_embeddings"):
        load_config(None, ["loss.content_id=0.1", "model.user.id_embeddings=false", "finetune.id_embeddings=false"])
    with pytest.raises(ValueError, match="finetune.from_path is not set: pass --from"):
        load_config(None, ["data.domains=a"]).check_ready()
    with pytest.raises(ValueError, match="data.domains is empty: name the target domain folders with --data"):
        load_config(None, ["finetune.from_path=none"]).check_ready()
    load_config(None, ["finetune.from_path=none", "data.domains=a"]).check_ready()


def test_help_lists_the_finetune_section_and_pretrainings_does_not() -> None:
    assert "finetune.lora_rank: int = 8" in config_help()
    assert "finetune." not in pretrain_config.config_help()


@pytest.mark.parametrize(("steps", "warmup"), [(30, 3), (99, 9), (150, 15), (2000, 100)])
def test_finetunes_default_warmup_fits_a_short_run(steps: int, warmup: int, capsys) -> None:
    # optim is not inherited from the pretrained run: finetune's warm-up is the default, 100 steps, unless set
    assert main(["--from", "none", "--data", "target", f"optim.max_steps={steps}", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)["optim"]  # what --print-config shows is what the run saves
    assert (printed["max_steps"], printed["warmup_steps"]) == (steps, warmup)


def test_a_finetune_warmup_set_longer_than_the_run_is_cut_with_a_warning(caplog) -> None:
    cfg = resolve_config("none", ["target"], "lora", (), ["optim.max_steps=40", "optim.warmup_steps=100"])
    assert cfg.optim.warmup_steps == 4
    assert [r.levelname for r in caplog.records if "longer than the run" in r.getMessage()] == ["WARNING"]


def test_the_warmup_warning_comes_once_when_the_source_is_set_in_a_file(tmp_path: Path, caplog) -> None:
    # --from in a file: a first pass over the files finds it, the second builds the config; one warning, not two
    file = tmp_path / "ft.toml"
    file.write_text('[finetune]\nfrom_path = "none"\n', encoding="utf-8")
    cfg = resolve_config(None, ["target"], "lora", [file], ["optim.max_steps=40", "optim.warmup_steps=100"])
    assert cfg.optim.warmup_steps == 4
    assert [r.levelname for r in caplog.records if "longer than the run" in r.getMessage()] == ["WARNING"]
