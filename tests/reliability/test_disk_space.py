"""Disk: the shard builder and the checkpointer check free space before writing and fail early, with a message
that names the folder and the sizes (the file system's free space is faked small)."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from reliability_support import engine_tests

from pretrain.__main__ import main
from shards.build import BuildOptions, build
from shards.errors import InputError
from shards.synth import synthesize
from tests.testutil import TINY, tiny_overrides

clean_dist_env = engine_tests.clean_dist_env  # autouse here too: in-process runs leave no launcher variables
Usage = namedtuple("Usage", "total used free")


def fake_free(monkeypatch, free: int, under: Path) -> None:
    """shutil.disk_usage reports ``free`` bytes for folders below ``under`` (the truth elsewhere)."""
    real = shutil.disk_usage

    def usage(path):
        if Path(path).resolve().is_relative_to(under.resolve()):
            return Usage(10 * free, 9 * free, free)
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", usage)


def test_the_builder_refuses_to_start_without_room(tmp_path: Path, monkeypatch) -> None:
    (src,) = synthesize(tmp_path / "src", domains=["books"], users_per_domain=20, items_per_domain=30, n_topics=2)
    opts = BuildOptions(min_user_interactions=3, image_size=32, samples_per_shard=8)
    fake_free(monkeypatch, 10_000, tmp_path / "small")
    with pytest.raises(InputError, match=r"not enough free space in .*small for the shards of .*MiB needed"):
        build(src, tmp_path / "small" / "books", opts, progress=False)
    assert not any((tmp_path / "small").iterdir())  # nothing written, not even the temporary folder
    manifest = build(src, tmp_path / "roomy" / "books", opts, progress=False)  # the estimate is no fantasy
    written = sum(s["bytes"] for kind in ("items", "seqs") for s in manifest["shards"][kind])
    fake_free(monkeypatch, int(written * 0.9), tmp_path / "tight")
    with pytest.raises(InputError, match="not enough free space"):
        build(src, tmp_path / "tight" / "books", opts, progress=False)


def test_the_checkpointer_refuses_to_start_without_room(folders, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    fake_free(monkeypatch, 100_000, out)
    more = ["optim.max_steps=1", "optim.warmup_steps=0", "run.save_every=1", "data.valid_domains=[]"]
    argv = ["--config", str(TINY), *tiny_overrides(folders, out, *more)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: not enough free space in {out / 'checkpoints'} for a checkpoint" in err, err[-2000:]
    assert not any((out / "checkpoints").iterdir())
