"""A model that is not on disk is one line naming its config key, before any start-up (momrec never downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.__main__ import main as finetune_main
from pretrain.__main__ import main as pretrain_main
from pretrain.config import load_config
from pretrain.families import check_on_disk, not_on_disk

HUB_ID = "nobody-here/no-such-model-xyz"


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_pretrain_names_the_key_of_a_model_not_on_disk(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    rc = pretrain_main(["--config", "launch/configs/missrec.toml", f"data.domains={tmp_path}", f"run.out_dir={out}"])
    assert rc == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: model.image.name_or_path: 'google/vit-base-patch16-224-in21k' is no local folder")
    assert "hf download google/vit-base-patch16-224-in21k" in line
    assert not out.exists()  # refused before anything was started or written


def test_finetune_names_the_key_of_a_model_not_on_disk(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    rc = finetune_main(["--from", "none", "--config", "launch/configs/tiny.toml", "--data", str(tmp_path),
                        f"model.text.name_or_path={HUB_ID}", f"run.out_dir={out}"])  # fmt: skip
    assert rc == 2
    assert _one_error_line(capsys).startswith(f"error: model.text.name_or_path: '{HUB_ID}' is no local folder")
    assert not out.exists()


def test_what_is_not_a_model(tmp_path: Path) -> None:
    assert not_on_disk(str(tmp_path)) == f"the folder {tmp_path} holds no config.json"
    (tmp_path / "file").write_text("x")
    assert not_on_disk(str(tmp_path / "file")) == f"{tmp_path / 'file'} is a file, not a model folder"
    assert not_on_disk("a/b/c") == "'a/b/c' is no folder and no Hugging Face model id"
    (tmp_path / "config.json").write_text("{}")
    assert not_on_disk(str(tmp_path)) is None


def test_shipped_default_model_is_on_disk_and_disabled_towers_are_not_checked() -> None:
    cfg = load_config(["launch/configs/small_cpu.toml"])
    names = cfg.model.backbone_names()
    assert list(names) == ["model.text.name_or_path"]  # the image tower is random from its architecture's config
    check_on_disk(names)
    off = load_config(["launch/configs/missrec.toml"], ["model.image.enabled=false", "model.fusion.kind=sum"])
    assert "model.image.name_or_path" not in off.model.backbone_names()
