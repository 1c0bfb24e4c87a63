"""Untrusted content: a pickle payload planted in a shard or in a checkpoint folder never runs.

The payload's ``__reduce__`` calls ``exec``, which touches a marker file: each test first shows that a plain
unpickler (WebDataset's default decoders, ``torch.load(weights_only=False)``) does run it, so the test could fail,
then that none of our readers does. Shards are read as raw bytes (no decoder); DeepSpeed's checkpoint files are
read with ``torch.load(weights_only=True)`` and a short allow-list (pretrain.checkpoint.SafeLoads).
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from reliability_support import engine_tests, shard_fixtures

from pretrain import catalog, checkpoint, heldout
from pretrain.__main__ import main
from shards import schema
from shards.inspect import read_shard
from shards.stream import SequenceStream
from shards.stream_config import StreamConfig
from tests.testutil import TINY, tiny_overrides

clean_dist_env = engine_tests.clean_dist_env  # autouse here too: in-process runs leave no launcher variables


class Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",)


def _armed(marker: Path, run_it) -> None:
    """The control: ``run_it`` (a plain unpickler) does execute the payload."""
    assert not marker.exists()
    run_it()
    assert marker.exists(), "the payload did not run under a plain unpickler: the test proves nothing"
    marker.unlink()


# ---- shards ------------------------------------------------------------------------------------------


def _plant(tar: Path, payload: bytes, torch_payload: bytes) -> str:
    """Insert ``<key>.pyd``, ``.pickle`` and ``.pth`` members into the first sample of ``tar``; returns its key."""
    with tarfile.open(tar) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    key = members[0][0].name.split(".", 1)[0]
    last = max(i for i, (m, _) in enumerate(members) if m.name.split(".", 1)[0] == key)
    evil = [(f"{key}.pyd", payload), (f"{key}.pickle", payload), (f"{key}.pth", torch_payload)]
    with tarfile.open(tar, "w") as out:
        for i, (member, data) in enumerate(members):
            out.addfile(member, io.BytesIO(data))
            if i == last:
                for name, blob in evil:
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    out.addfile(info, io.BytesIO(blob))
    return key


def test_a_pickle_planted_in_shards_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    dom = shard_fixtures.write_domain(tmp_path / "evil", [5, 4])
    payload = pickle.dumps(Payload(marker))
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    seqs, items = dom.folder / schema.shard_name("seqs", 0), dom.folder / schema.shard_name("items", 0)
    for tar in (seqs, items):
        _plant(tar, payload, buf.getvalue())
        _armed(marker, lambda tar=tar: list(wds.WebDataset(str(tar), shardshuffle=False).decode()))

    cfg = StreamConfig(batch_size=3, num_workers=0, shuffle_buffer=0, image_size=16, max_text_len=16)
    stream = SequenceStream([dom.folder], cfg, rank=0, world_size=1)
    batches = list(stream)
    assert len(batches) == len(stream) == 3 and stream.stats["bad_samples"] == 0  # planted members are ignored
    held_out = list(heldout.held_out_users(dom.folder, "test", max_seq_len=10))
    assert len(held_out) == dom.n_samples
    tables = list(catalog.catalog_tables(dom.folder, 0, cfg, chunk=8))
    assert sum(len(t) for t in tables) == len(dom.items)
    raw = next(read_shard(items))
    assert isinstance(raw["pyd"], bytes) and schema.decode_item(raw).index == 0  # bytes, never decoded
    assert not marker.exists(), "a reader unpickled shard content"


# ---- checkpoints -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_pickle_planted_in_a_checkpoint_is_refused_before_it_runs(
    folders, tmp_path: Path, capsys, target: str
) -> None:
    """A ZeRO-1 run saves step 1; one of DeepSpeed's files is swapped for a payload (the model states, read by
    its state-dict loader, or the optimizer partition, read by its ZeRO loader). Resuming is a clear error
    naming the file, and the payload has not run."""
    marker, out = tmp_path / "pwned", tmp_path / "run"
    common = ["engine.zero_stage=1", "optim.warmup_steps=0", "run.save_every=1", "data.valid_domains=[]"]
    checkpoint_run = engine_tests.config(folders, out, "optim.max_steps=1", *common)
    from pretrain.engine import train

    train(checkpoint_run)
    path = out / "checkpoints" / "step00000001" / target
    assert path.is_file(), sorted(p.name for p in path.parent.iterdir())
    for name in DEEPSPEED_FILES_ARE_SAFE:  # the genuine files need nothing beyond the allow-list
        checkpoint.safe_torch_load(path.parent / name)
    torch.save({"module": Payload(marker), "optimizer_state_dict": Payload(marker)}, path)
    _armed(marker, lambda: torch.load(path, weights_only=False))

    argv = ["--config", str(TINY), *tiny_overrides(folders, out, "optim.max_steps=2", *common)]
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: refused to load" in err and "Traceback" not in err, err[-2000:]
    assert not marker.exists(), "resuming unpickled the planted payload"


DEEPSPEED_FILES_ARE_SAFE = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt")


def test_the_safe_loader_refuses_other_globals_and_garbage(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil, garbage = tmp_path / "evil.pt", tmp_path / "garbage.pt"
    torch.save([torch.ones(2), Payload(marker)], evil)
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"evil\.pt: refused to load"):
        checkpoint.safe_torch_load(evil)
    with pytest.raises(ValueError, match=r"garbage\.pt: not a readable checkpoint file"):
        checkpoint.safe_torch_load(garbage)
    assert not marker.exists()
    torch.save({"w": torch.arange(3)}, tmp_path / "plain.pt")
    assert torch.equal(checkpoint.safe_torch_load(tmp_path / "plain.pt")["w"], torch.arange(3))
