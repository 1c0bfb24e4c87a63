"""The installed commands run from any folder, also one that holds data folders named like the packages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


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
