"""The training stream checks every shard it reads against the manifest: sequences the manifest promises and the
shard does not deliver (a flipped bit in a tar header silently ends the archive there) are counted as
``missing_samples``, and sequences a shard holds beyond the manifest's count (an edited manifest) as
``extra_samples``; each is a warning naming the shard and both numbers, and both counts reach the logged stats."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

from reliability_support import shard_fixtures

from pretrain.runlog import STREAM_STATS
from shards import schema
from shards.stream import SequenceStream
from shards.stream_config import StreamConfig

CFG = StreamConfig(batch_size=2, num_workers=0, shuffle_buffer=0, image_size=16, max_text_len=16)


def _flip_header_bit(shard: Path, sample: int) -> None:
    """Flip one bit in the name of the first tar member of ``sample``: its header checksum no longer matches."""
    with tarfile.open(shard) as tar:
        keys = []
        for member in tar.getmembers():
            key = member.name.split(".")[0]
            if key not in keys:
                keys.append(key)
                if len(keys) == sample + 1:
                    offset = member.offset
                    break
    data = bytearray(shard.read_bytes())
    data[offset + 3] ^= 0x01
    shard.write_bytes(bytes(data))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_corrupt_tar_header_is_counted_as_the_sequences_lost(tmp_path: Path, caplog) -> None:
    dom = shard_fixtures.write_domain(tmp_path / "books", [8, 8, 8])
    shard = dom.folder / schema.shard_name("seqs", 1)
    _flip_header_bit(shard, 3)  # samples 3..7 of the shard are never read: the archive "ends" there
    stream = SequenceStream([dom.folder], CFG, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING):
        batches = list(stream)
    assert len(batches) == len(stream)
    assert stream.stats["missing_samples"] == 5, stream.stats
    said = [m for m in _warnings(caplog) if str(shard) in m and "missing" in m]
    assert len(said) == 1 and "3 of the 8 samples" in said[0], _warnings(caplog)


def test_a_manifest_claiming_fewer_samples_is_counted_and_warned(tmp_path: Path, caplog) -> None:
    dom = shard_fixtures.write_domain(tmp_path / "books", [8, 8, 8])
    path = dom.folder / schema.MANIFEST_NAME
    doc = json.loads(path.read_text())
    for info in doc["shards"]["seqs"]:
        info["samples"] = 6  # the manifest lies: each shard holds 8
    path.write_text(json.dumps(doc))
    stream = SequenceStream([dom.folder], CFG, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING):
        assert len(list(stream)) == len(stream) == 9
    assert stream.stats["extra_samples"] == 3 * 2 and stream.stats["missing_samples"] == 0, stream.stats
    for number in range(3):
        shard = str(dom.folder / schema.shard_name("seqs", number))
        said = [m for m in _warnings(caplog) if shard in m and "more" in m]
        assert len(said) == 1 and "holds 8 samples" in said[0] and "manifest says 6" in said[0], _warnings(caplog)


def test_an_intact_domain_counts_nothing_and_the_counts_are_logged_stats(tmp_path: Path) -> None:
    dom = shard_fixtures.write_domain(tmp_path / "books", [8, 5, 8])
    stream = SequenceStream([dom.folder], StreamConfig(batch_size=3, num_workers=2, image_size=16), 0, 1)
    assert len(list(stream)) == 7
    assert stream.stats["missing_samples"] == stream.stats["extra_samples"] == 0
    assert {"missing_samples", "extra_samples"} <= set(STREAM_STATS)  # summed over ranks into data/<name>
