"""Hostile shard samples: JSON nested 100,000 levels deep, a 5,000-digit number, an item index of 10^30, a
timestamp too large for a float, an index just past the catalog, a member over the size limit. Each is a counted,
logged bad sample in the training stream and at evaluation, and one problem line naming the shard file, the
sample key and the field in ``python -m shards verify``; never a RecursionError, an OverflowError or a traceback."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import webdataset as wds
from reliability_support import shard_fixtures

from pretrain import evaluate
from pretrain.catalog import catalog_tables
from pretrain.heldout import held_out_users
from shards import schema
from shards.__main__ import main as shards_main
from shards.errors import InputError
from shards.inspect import read_shard
from shards.stream import SequenceStream
from shards.stream_config import StreamConfig

DEEP = b"[" * 100_000 + b"]" * 100_000
MEMBER_LIMIT = 256_000
"""schema.MAX_MEMBER_BYTES in these tests (the real one is 64 MiB): above the 200 KB of DEEP, below 64 MiB."""


def _edit_meta(sample: dict, edit: Callable[[dict], None]) -> dict:
    meta = json.loads(sample["json"])
    edit(meta)
    return {**sample, "json": json.dumps(meta).encode()}


def _set(path: str, value: object) -> Callable[[dict], None]:
    """An edit setting ``meta[a][b]...`` for ``path`` 'a.b...' (digits index lists)."""

    def edit(meta: dict) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        for p in parents:
            meta = meta[p]
        meta[last] = value

    return edit


def _timestamps_too_large(meta: dict) -> None:
    meta["timestamps"] = [10**400] * len(meta["seq"])


HOSTILE: dict[int, tuple[str, Callable[[dict], dict]]] = {
    1: ("json", lambda s: {**s, "json": b'{"schema": 1, "index": 1, "seq": ' + DEEP + b"}"}),
    2: ("json", lambda s: {**s, "json": s["json"].replace(b'"index":2,', b'"index":' + b"9" * 5000 + b",", 1)}),
    3: ("items[0].index", lambda s: _edit_meta(s, _set("items.0.index", 10**30))),
    4: ("timestamps", lambda s: _edit_meta(s, _timestamps_too_large)),
    5: ("items[0].index", lambda s: _edit_meta(s, _set("items.0.index", 15))),  # the catalog has 15 items
    6: ("json", lambda s: _edit_meta(s, _set("items.0.text", "x" * MEMBER_LIMIT))),
}
"""User -> (the field named, how its sample is broken)."""


def rewrite_shard(folder: Path, name: str, edit: Callable[[int, dict], dict]) -> None:
    """Rewrite the shard ``name`` with ``edit(number, sample)`` applied to each raw sample, and its size and
    checksum in the manifest, so that only the samples are wrong."""
    tar = folder / name
    samples = [{k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"} for raw in read_shard(tar)]
    with wds.TarWriter(str(tar), encoder=False, mtime=0) as sink:
        for number, sample in enumerate(samples):
            sink.write(edit(number, sample))
    doc = json.loads((folder / schema.MANIFEST_NAME).read_text())
    for info in doc["shards"]["seqs"] + doc["shards"]["items"]:
        if info["name"] == name:
            data = tar.read_bytes()
            info["bytes"], info["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (folder / schema.MANIFEST_NAME).write_text(json.dumps(doc))


def _break(number: int, sample: dict) -> dict:
    return HOSTILE[number][1](sample) if number in HOSTILE else sample


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch) -> shard_fixtures.Domain:
    """12 users of 15 items in 2 shards; users 1-6 of shard 0 are broken as HOSTILE says."""
    monkeypatch.setattr(schema, "MAX_MEMBER_BYTES", MEMBER_LIMIT)
    dom = shard_fixtures.write_domain(tmp_path / "hostile", [8, 4], n_items=15)
    rewrite_shard(dom.folder, schema.shard_name("seqs", 0), _break)
    return dom


def _said_once(messages: list[str], shard: Path, user: int, field: str) -> None:
    said = [m for m in messages if f"'{schema.user_key(user)}'" in m and "skipping bad sample" in m]
    assert len(said) == 1, (user, messages)
    assert str(shard) in said[0] and f"field {field!r}" in said[0], said[0]


def test_the_stream_counts_and_logs_each_hostile_sample(hostile, caplog) -> None:
    cfg = StreamConfig(batch_size=2, num_workers=0, shuffle_buffer=4, image_size=16, max_text_len=16)
    stream = SequenceStream([hostile.folder], cfg, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING):
        batches = list(stream)
    assert len(batches) == len(stream) > 0
    assert not {u for b in batches for u in b.user_index.tolist()} & set(HOSTILE)
    assert stream.stats["bad_samples"] >= len(HOSTILE)
    messages = [r.getMessage() for r in caplog.records]
    for user, (field, _) in HOSTILE.items():
        _said_once(messages, hostile.folder / schema.shard_name("seqs", 0), user, field)


def test_verify_names_the_file_sample_and_field_of_each(hostile, capsys) -> None:
    assert shards_main(["verify", str(hostile.folder)]) == 1
    out = capsys.readouterr().out
    assert "Traceback" not in out
    for user, (field, _) in HOSTILE.items():
        lines = [ln for ln in out.splitlines() if f"sample '{schema.user_key(user)}'" in ln]
        assert len(lines) == 1 and lines[0].startswith(f"FAIL seqs-000000.tar: sample '{schema.user_key(user)}'")
        assert f"field {field!r}" in lines[0], lines[0]
    assert "nested too deeply" in out and "Exceeds the limit (4300 digits)" in out
    assert "a 31-digit number is outside [0, 15)" in out and "15 is outside [0, 15)" in out
    assert f"over the limit of {MEMBER_LIMIT:,}" in out


def test_evaluation_skips_and_counts_them(hostile, caplog) -> None:
    counts: Counter = Counter()
    with caplog.at_level(logging.WARNING):
        users = list(held_out_users(hostile.folder, "test", 50, counts=counts))
    assert sorted(u.user for u in users) == sorted(set(range(12)) - set(HOSTILE))
    assert counts["bad_samples"] == len(HOSTILE)
    assert all(0 <= i < 15 for u in users for i in (u.target, *u.history))
    messages = [r.getMessage() for r in caplog.records]
    for user, (field, _) in HOSTILE.items():
        _said_once(messages, hostile.folder / schema.shard_name("seqs", 0), user, field)


def test_python_m_pretrain_evaluate_counts_them_and_goes_on_past_them_only_when_asked(
    folders, exported: Path, tmp_path: Path, capsys
) -> None:
    """The whole command on a built domain whose first seqs shard holds an item index of 10^30 (was: ``error:
    Overflow when unpacking long long``, naming no file) and JSON nested 100,000 levels (was: a RecursionError):
    both are counted; a result over fewer users than the manifest promises is an error, or with --allow-partial a
    result that says so."""
    data = tmp_path / "movies"
    shutil.copytree(folders[1], data)
    broken = {1: HOSTILE[1], 3: HOSTILE[3]}
    rewrite_shard(data, schema.shard_name("seqs", 0), lambda n, s: broken[n][1](s) if n in broken else s)
    out = ["--out", str(tmp_path / "eval.json")]
    assert evaluate.main(["--model", str(exported), "--data", str(data), *out]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Overflow" not in err, err[-2000:]
    assert "users the manifest promises (2 bad samples" in err, err[-2000:]
    assert evaluate.main(["--model", str(exported), "--data", str(data), "--allow-partial", *out]) == 0
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert doc["bad_samples"] == 2 and doc["metrics"] and doc["partial"]


def test_a_hostile_catalog_item_at_evaluation_is_an_error_naming_it(
    folders, exported: Path, tmp_path: Path, capsys
) -> None:
    data = tmp_path / "movies"
    shutil.copytree(folders[1], data)
    shard = data / schema.shard_name("items", 0)
    rewrite_shard(data, shard.name, lambda n, s: _edit_meta(s, _set("index", 10**30)) if n == 3 else s)
    assert evaluate.main(["--model", str(exported), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"error: {shard}: sample 'item00000003': field 'index': a 31-digit number is outside [0, " in err, err
    assert "the catalog is incomplete" in err and "Traceback" not in err


def test_every_rank_meets_a_hostile_catalog_item(hostile) -> None:
    """Each rank collates only its own chunks of the catalog but decodes them all: a bad item in rank 0's chunk
    stops rank 1 too, rather than leaving it waiting for rank 0 in a collective."""
    rewrite_shard(hostile.folder, schema.shard_name("items", 0), lambda n, s: {**s, "json": DEEP} if n == 2 else s)
    cfg = StreamConfig(num_workers=0, image_size=16, max_text_len=16)
    for rank in (0, 1):
        with pytest.raises(InputError, match=r"items-000000.tar: sample 'item00000002': field 'json': malformed JSON"):
            list(catalog_tables(hostile.folder, 0, cfg, chunk=4, rank=rank, world=2))
