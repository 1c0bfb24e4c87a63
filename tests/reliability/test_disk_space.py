"""Disk: the shard builder, the subset, the checkpointer and the exports check free space before writing and fail
early, with a message that names the folder and the sizes (the file system's free space is faked small); a disk
that fills up anyway while they write (ENOSPC injected into the writer) is one ``error:`` line, and no half-written
output is left behind."""

from __future__ import annotations

import errno
import os
import shutil
from collections import namedtuple
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors
import safetensors.torch
import torch
import webdataset as wds
from reliability_support import engine_tests, evaluate_tests

import finetune.config
import pretrain.export
from finetune.export import save_finetuned
from pretrain.__main__ import main
from pretrain.configlib import to_dict
from pretrain.outputs import rank0_folder
from shards.__main__ import main as shards_main
from shards.build import BuildOptions, build
from shards.errors import InputError
from shards.subset import subset
from shards.synth import synthesize
from tests.testutil import TINY, fork_two_ranks, tiny_overrides

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


# ---- a disk that fills up while writing ------------------------------------------------------------------------


def fill_up_after(monkeypatch, target: object, name: str, calls: int, error: BaseException) -> None:
    """``target.name`` raises ``error`` from its ``calls + 1``-th call on (the disk fills up)."""
    real, seen = getattr(target, name), [0]

    def writing(*args, **kwargs):
        seen[0] += 1
        if seen[0] > calls:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, writing)


ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp" in p.name)


def test_a_disk_filling_during_a_build_or_subset_is_one_error_line(tmp_path: Path, monkeypatch, capsys) -> None:
    (src,) = synthesize(tmp_path / "src", domains=["books"], users_per_domain=20, items_per_domain=30, n_topics=2)
    shards = tmp_path / "shards"
    common = ["--min-user-interactions", "3", "--image-size", "32", "--samples-per-shard", "4", "--no-progress"]
    assert shards_main(["build", "--input", str(src), "--out", str(shards / "books"), *common]) == 0
    capsys.readouterr()
    with monkeypatch.context() as m:
        fill_up_after(m, wds.TarWriter, "write", 5, ENOSPC)  # a few samples written, then the disk is full
        assert shards_main(["build", "--input", str(src), "--out", str(shards / "again"), *common]) == 2
        err = capsys.readouterr().err
        assert f"error: the disk filled up while writing the shards of {shards / 'again'} into {shards}: about " in err
        assert "MiB needed" in err and "MiB free" in err and "Traceback" not in err, err[-2000:]
        assert not (shards / "again").exists() and leftovers(shards) == []

        argv = ["subset", str(shards / "books"), "--fraction", "0.5", "--out", str(shards / "half")]
        assert shards_main(argv) == 2
        err = capsys.readouterr().err
        assert f"error: the disk filled up while writing the subset {shards / 'half'} into {shards}: " in err, err
        assert "Traceback" not in err and not (shards / "half").exists() and leftovers(shards) == []


def test_the_subset_refuses_to_start_without_room(tmp_path: Path, monkeypatch) -> None:
    (src,) = synthesize(tmp_path / "src", domains=["books"], users_per_domain=20, items_per_domain=30, n_topics=2)
    opts = BuildOptions(min_user_interactions=3, image_size=32, samples_per_shard=8)
    build(src, tmp_path / "books", opts, progress=False)
    fake_free(monkeypatch, 1000, tmp_path / "small")
    (tmp_path / "small").mkdir()
    with pytest.raises(InputError, match=r"not enough free space in .*small for the subset .*MiB needed"):
        subset(tmp_path / "books", tmp_path / "small" / "half", 0.5, progress=False)
    assert not any((tmp_path / "small").iterdir())


def _engine(model) -> SimpleNamespace:
    return SimpleNamespace(module=model, zero_optimization_stage=lambda: 0)


@pytest.fixture(scope="module")
def tiny(folders) -> tuple:
    cfg = evaluate_tests.tiny_config(folders)
    return cfg, evaluate_tests.tiny_model(cfg, folders)


def _pretrained(tiny, folder: Path) -> Path:
    cfg, model = tiny
    return pretrain.export.export(_engine(model), cfg, model.catalog, folder)


def _finetuned(tiny, folder: Path) -> Path:
    cfg, model = tiny
    finetune_cfg = finetune.config.from_dict(to_dict(cfg))  # the same config under finetune's root
    return save_finetuned(model, finetune_cfg, model.catalog, None, folder)


@pytest.mark.parametrize("write", [_pretrained, _finetuned], ids=["pretrained", "finetuned"])
def test_an_export_checks_the_space_and_a_full_disk_leaves_the_previous_one(
    tiny, tmp_path: Path, monkeypatch, write
) -> None:
    """The final export used to check nothing: a full disk gave a traceback (on every rank) and an empty
    ``model.tmp``. Now it is refused before writing when there is no room, and a disk that fills up anyway is one
    error naming the folder, the partial folder removed and the previous export untouched."""
    folder = tmp_path / "run" / "model"
    write(tiny, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with monkeypatch.context() as m:
        fake_free(m, 10_000, tmp_path / "run")
        with pytest.raises(ValueError, match=rf"not enough free space in {tmp_path / 'run'} for the .* MiB needed"):
            write(tiny, folder)
    full = safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with monkeypatch.context() as m:
        fill_up_after(m, safetensors.torch, "save_file", 0, full)
        with pytest.raises(ValueError, match=rf"the disk filled up while writing the .* into {tmp_path / 'run'}: "):
            write(tiny, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert leftovers(tmp_path / "run") == []


def _rank(rank: int, port: int, folder: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=20))
    shutil.disk_usage = lambda path: Usage(10**6, 10**6 - 1000, 1000)  # 1000 bytes free
    try:
        with rank0_folder(folder / "model", 10**6, "the export") as tmp:
            said = f"wrote, rank 0: {tmp is not None}"
    except ValueError as e:
        said = f"ValueError: {e}"
    (folder / f"rank{rank}.txt").write_text(said)
    torch.distributed.destroy_process_group()
    os._exit(0)


@pytest.mark.dist
def test_every_rank_gets_rank_0s_verdict(tmp_path: Path) -> None:
    """Two gloo ranks: rank 0 finds no room; both raise the same ValueError (none waits in a collective)."""
    assert fork_two_ranks(_rank, lambda rank: (tmp_path,), timeout_s=60) == [0, 0]
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert said[0] == said[1] and said[0].startswith(f"ValueError: not enough free space in {tmp_path}"), said
    assert leftovers(tmp_path) == []
