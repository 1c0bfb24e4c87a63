"""Corrupt data: every kind of bad sample is skipped, counted and logged once with its shard and key, and the run
goes on; the counts reach TensorBoard and the end-of-run log. A shard that cannot be opened at all is an error
naming it, before any rank starts training (so no rank waits for another in a collective). A truncated items
shard at evaluation is an error naming it: the catalog is incomplete."""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from reliability_support import engine_tests, shard_fixtures

from pretrain import evaluate
from pretrain.__main__ import main
from shards import schema
from shards.inspect import read_shard
from shards.stream import SequenceStream
from shards.stream_config import StreamConfig
from tests.testutil import TINY, tiny_overrides

clean_dist_env = engine_tests.clean_dist_env  # autouse here too: in-process runs leave no launcher variables

GARBAGE_JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4
"""A JPEG's first bytes, then garbage."""


def _rewrite(tar: Path, edit) -> None:
    """Rewrite ``tar`` with ``edit(number, sample)`` applied to each raw sample (a fresh dict of field -> bytes)."""
    samples = [{k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"} for raw in read_shard(tar)]
    with wds.TarWriter(str(tar), encoder=False, mtime=0) as sink:
        for number, sample in enumerate(samples):
            sink.write(edit(number, sample))


def _edit_json(sample: dict, **changes) -> dict:
    import json

    meta = json.loads(sample["json"])
    for name, value in changes.items():
        if name == "first_text":
            meta["items"][0]["text"] = value
        else:
            meta[name] = value
    return {**sample, "json": json.dumps(meta).encode()}


def _break(number: int, sample: dict) -> dict:
    if number == 1:
        return _edit_json(sample, index="seven")  # a JSON field of the wrong type
    if number == 2:
        return _edit_json(sample, seq=[0])  # a sequence of length 1
    if number == 3:
        return _edit_json(sample, first_text="  ")  # an empty text
    if number == 4:
        images = sorted(k for k in sample if k.startswith("img"))
        return {**sample, images[0]: GARBAGE_JPEG}  # a JPEG with garbage bytes
    return sample


@pytest.fixture
def broken(tmp_path: Path) -> shard_fixtures.Domain:
    """18 users in 3 shards: shard 0 holds a wrong-type field, a length-1 sequence, an empty text and a garbage
    JPEG (users 1-4); user 7's JSON does not parse; item 0's image is not a JPEG; shard 2 is cut in half."""
    dom = shard_fixtures.write_domain(tmp_path / "broken", [6, 6, 6], bad_users=[7], bad_images=[0])
    _rewrite(dom.folder / schema.shard_name("seqs", 0), _break)
    cut = dom.folder / schema.shard_name("seqs", 2)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    return dom


def test_the_stream_skips_counts_and_logs_each_bad_sample_once(broken, caplog) -> None:
    cfg = StreamConfig(batch_size=3, num_workers=0, shuffle_buffer=4, image_size=16, max_text_len=16)
    stream = SequenceStream([broken.folder], cfg, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING):
        batches = list(stream) + list(stream.set_epoch(1) or stream)  # two epochs: the bad samples met again
    assert len(batches) == 2 * len(stream)
    users = {u for b in batches for u in b.user_index.tolist()}
    assert not users & {1, 2, 7} and {3, 4} <= users  # skipped; kept (with no text, without the image)
    stats = stream.stats
    assert stats["bad_samples"] >= 2 * 3 and stats["tar_errors"] >= 1
    assert stats["empty_texts"] >= 1 and stats["bad_images"] >= 1

    shard0 = str(broken.folder / schema.shard_name("seqs", 0))
    messages = [r.getMessage() for r in caplog.records]
    for key, field in (("user00000001", "'index'"), ("user00000002", "'seq'"), ("user00000007", "'json'")):
        said = [m for m in messages if f"'{key}'" in m and "skipping bad sample" in m]
        assert len(said) == 1, (key, messages)  # once, though met in both epochs
        assert field in said[0] and ("seqs-000001.tar" if key == "user00000007" else shard0) in said[0]
    assert sum(f"{shard0}: sample 'user00000003'" in m and "empty text" in m for m in messages) == 1
    assert any("image dropped" in m and "seqs-00000" in m and "sample 'user" in m for m in messages)
    assert any("seqs-000002.tar" in m and "unreadable tar content" in m for m in messages)


def test_training_goes_on_and_reports_the_counts(folders, broken, tmp_path: Path, caplog) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.engine import train

    out = tmp_path / "run"
    more = ["optim.max_steps=3", "optim.warmup_steps=0", "run.log_every=1", "run.eval_every=0", "run.eval_users=8"]
    cfg = engine_tests.config([str(broken.folder)], out, *more, "data.stream.batch_size=4")
    with caplog.at_level(logging.INFO, logger="pretrain.engine"):
        last = train(cfg)
    assert last["run/step"] == 3
    assert last["data/bad_samples"] >= 3 and last["data/bad_images"] >= 1 and last["data/empty_texts"] >= 1
    assert last["data/tar_errors"] >= 1 and last["data/missing_samples"] >= 1  # the second half of the cut shard

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    for name in ("bad_samples", "bad_images", "empty_texts", "tar_errors"):
        values = [e.value for e in acc.Scalars(f"data/{name}")]
        assert len(values) == 3 and values[-1] == last[f"data/{name}"] > 0, name
    end = [r.getMessage() for r in caplog.records if "data skipped or repaired" in r.getMessage()]
    assert len(end) == 1 and f"bad_samples {int(last['data/bad_samples'])}" in end[0], end


@pytest.mark.parametrize("damage", ["garbage", "empty", "directory", "unreadable"])
def test_a_shard_that_cannot_be_opened_is_an_error_naming_it(broken, tmp_path: Path, capsys, damage: str) -> None:
    shard = broken.folder / schema.shard_name("seqs", 1)
    if damage == "garbage":
        shard.write_bytes(b"\x00\x01 this is no tar " * 100)
    elif damage == "empty":
        shard.write_bytes(b"")
    elif damage == "directory":
        shard.unlink()
        shard.mkdir()
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads files whatever their mode")
        shard.chmod(0)
    cfg = StreamConfig(batch_size=3, num_workers=0)
    with pytest.raises(ValueError, match=str(shard)):
        SequenceStream([broken.folder], cfg, rank=0, world_size=1)
    argv = ["--config", str(TINY), *tiny_overrides([str(broken.folder)], tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {shard}" in err and "Traceback" not in err, err[-2000:]


def test_a_truncated_items_shard_stops_training_before_its_first_step(folders, tmp_path: Path, capsys) -> None:
    """Training never reads the catalog's items shards until its first validation: a cut one used to be found only
    there, after the training it cost. The sizes are checked against the manifest before the first step."""
    data = tmp_path / "movies"
    shutil.copytree(folders[1], data)
    shard = data / schema.shard_name("items", 1)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    argv = ["--config", str(TINY), *tiny_overrides([str(data)], tmp_path / "run"), "optim.max_steps=2",
            "optim.warmup_steps=1"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {shard}: " in err and "truncated or damaged" in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("cut", ["inside a member", "between members"])
def test_a_truncated_items_shard_at_evaluation_is_an_error_naming_it(
    folders, exported: Path, tmp_path: Path, capsys, cut: str
) -> None:
    """``python -m pretrain.evaluate`` on a domain whose second items shard lost its end: exit 2 and one line naming
    the shard and the incomplete catalog, no traceback; cut between two members, tar reads fewer samples silently,
    and the count against the manifest says so."""
    data = tmp_path / "movies"
    shutil.copytree(folders[1], data)
    shard = data / schema.shard_name("items", 1)
    with tarfile.open(shard) as tar:
        middle = max(tar.getmembers()[4:-4], key=lambda m: m.size)  # an image, in the middle of the shard
    end = middle.offset_data + middle.size // 2 if cut == "inside a member" else middle.offset
    shard.write_bytes(shard.read_bytes()[:end])
    assert evaluate.main(["--model", str(exported), "--data", str(data), "--users", "4"]) == 2
    err = capsys.readouterr().err
    assert f"error: {shard}: " in err and "Traceback" not in err, err[-2000:]
    assert "the catalog is incomplete (run `python -m shards verify" in err, err[-2000:]
    assert ("unreadable tar content" if cut == "inside a member" else "samples, the manifest says 16") in err
