"""The installed commands run from any folder, also one that holds data folders named like the packages, and the
console scripts of pyproject.toml resolve to the commands' main functions."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["shards", "pretrain", "finetune"])
def test_commands_run_from_a_folder_with_same_named_data_folders(tmp_path: Path, module: str) -> None:
    for name in ("shards", "pretrain", "finetune"):
        (tmp_path / name / "books").mkdir(parents=True)  # e.g. --out shards/books: a namespace-package look-alike
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the install may find the package
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


SCRIPTS = {
    "momrec-shards": "shards.__main__:main",
    "momrec-pretrain": "pretrain.__main__:main",
    "momrec-finetune": "finetune.__main__:main",
    "momrec-scaling": "finetune.scaling.__main__:main",
    "momrec-evaluate": "pretrain.evaluate:main",
    "momrec-serve": "serve.__main__:main",
}
REINSTALL = "pip install -e . --config-settings editable_mode=compat -c launch/constraints.txt --no-deps"


def test_the_console_scripts_are_the_ones_declared() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert declared == SCRIPTS
    installed = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts") if ep.name in SCRIPTS}
    assert installed == SCRIPTS, f"the installed metadata is stale: {REINSTALL}"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_entry_point_loads_and_answers_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    (ep,) = metadata.entry_points(group="console_scripts", name=name)
    main = ep.load()
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_the_scripts_run_from_the_environments_bin(tmp_path: Path) -> None:
    scripts = Path(sysconfig.get_path("scripts"))
    missing = [name for name in SCRIPTS if not (scripts / name).is_file()]
    assert not missing, f"{missing} not in {scripts}: {REINSTALL}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(scripts / "momrec-shards"), "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout and "{build,synth,stream,subset,inspect,verify}" in done.stdout
