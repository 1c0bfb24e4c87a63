"""The one guarded JSON decoder (shards.safejson) and the decoding of hostile shard samples (shards.schema): every
failure is a JSONProblem or a SampleError naming the shard, the sample and the field, never a RecursionError,
OverflowError or a plain ValueError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shards import safejson, schema
from shards.errors import InputError, Skips
from shards.formats.base import load_json_line
from shards.safejson import MAX_JSON_DEPTH, JSONProblem

DEEP = "[" * 100_000 + "]" * 100_000
DIGITS = "9" * 5000


@pytest.mark.parametrize("text", ['{"a": [1, 2.5, "x", null, true]}', " [] ", '"ü"', "-0", "1e400", "NaN"])
def test_ordinary_json_decodes_as_json_loads_does(text: str) -> None:
    assert repr(safejson.loads(text)) == repr(json.loads(text))


@pytest.mark.parametrize(
    ("text", "reason", "column"),
    [
        ('{"a": ' + DEEP + "}", "nested too deeply", 1),
        ('{"a": ' + "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1) + "}", "nested too deeply (more than", 1),
        ('{"a": ' + DIGITS + "}", "unreadable value (Exceeds the limit (4300 digits)", 1),
        ('{"a": 1,}', "Expecting property name enclosed in double quotes", 9),
        ('{"a": 1} x', "Extra data", 10),
        ("", "Expecting value", 1),
    ],
    ids=["nested-100000", "nested-101", "5000-digits", "syntax", "extra", "empty"],
)
def test_hostile_json_is_a_json_problem(text: str, reason: str, column: int) -> None:
    with pytest.raises(JSONProblem) as caught:
        safejson.loads(text)
    assert caught.value.reason.startswith(reason) and caught.value.column(text) == column


def test_exactly_max_depth_decodes() -> None:
    text = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert safejson.json_depth(safejson.loads(text)) == MAX_JSON_DEPTH


def test_a_json_line_of_a_source_file_is_a_counted_skip() -> None:
    skips = Skips()
    for number, text in enumerate([DEEP, DIGITS, '{"id": "a"}'], start=1):
        load_json_line(text, "items.jsonl", number, skips)
    assert [(r.line, r.reason.split(" (")[0]) for r in skips.records] == [
        (1, "malformed JSON: nested too deeply at column 1"),
        (2, "malformed JSON: unreadable value"),
    ]


# ---- shard samples -------------------------------------------------------------------------------------------


def _sample(**changes) -> dict:
    """A raw seqs-shard sample (3 items, 4 interactions) with ``changes`` made to its JSON."""
    items = (schema.Item(0, "a", "A", b"\xff\xd8jpg"), schema.Item(5, "b", None), schema.Item(9, "c", "C"))
    seq = schema.Sequence(index=3, id="u3", items=items, seq=(0, 1, 2, 0), timestamps=(1.0, 2.0, 3.0, 4.0))
    raw = {**schema.encode_seq(seq), "__url__": "/data/seqs-000004.tar"}
    meta = json.loads(raw["json"])
    for name, value in changes.items():
        if name == "item_index":
            meta["items"][1]["index"] = value
        else:
            meta[name] = value
    return {**raw, "json": json.dumps(meta).encode()}


def _raw_json(text: str) -> dict:
    return {"__key__": "user00000003", "__url__": "/data/seqs-000004.tar", "json": text.encode()}


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        (_raw_json('{"schema": 1, "seq": ' + DEEP + "}"), "json", "malformed JSON: nested too deeply"),
        (_raw_json('{"schema": 1, "index": ' + DIGITS + "}"), "json", "malformed JSON: unreadable value"),
        (_sample(item_index=10**30), "items[1].index", "a 31-digit number is outside [0, 2**63)"),
        (_sample(index=-1), "index", "-1 is outside [0, 2**63)"),
        (_sample(timestamps=[1, 10**400, 2, 3]), "timestamps", "must be null or one finite number"),
        (_sample(timestamps=[1, 1e400, 2, 3]), "timestamps", "must be null or one finite number"),
        (_sample(seq=[0, 1, 10**30]), "seq", "positions must be integers in [0, 3)"),
    ],
    ids=[
        "nested-100000",
        "5000-digits",
        "item-index-1e30",
        "negative-user",
        "timestamp-1e400",
        "timestamp-inf",
        "position-1e30",
    ],  # fmt: skip
)
def test_a_hostile_sample_is_a_sample_error_naming_shard_key_and_field(raw: dict, field: str, reason: str) -> None:
    with pytest.raises(schema.SampleError) as caught:
        schema.decode_seq(raw)
    e = caught.value
    assert (e.shard, e.key, e.field) == ("/data/seqs-000004.tar", "user00000003", field)
    assert e.reason.startswith(reason), e.reason


def test_indices_are_checked_against_the_catalog_and_user_counts() -> None:
    assert schema.decode_seq(_sample(), n_items=10, n_users=4).item_indices() == [0, 5, 9, 0]
    with pytest.raises(schema.SampleError, match=r"field 'items\[2\].index': 9 is outside \[0, 9\)"):
        schema.decode_seq(_sample(), n_items=9)
    with pytest.raises(schema.SampleError, match=r"field 'index': 3 is outside \[0, 3\)"):
        schema.decode_seq(_sample(), n_users=3)
    item = {**schema.encode_item(schema.Item(7, "x", "X")), "__url__": "items-000000.tar"}
    with pytest.raises(schema.SampleError, match=r"items-000000.tar: sample 'item00000007': field 'index': 7 is"):
        schema.decode_item(item, n_items=7)


def test_a_member_over_the_size_limit_makes_the_sample_bad(monkeypatch) -> None:
    monkeypatch.setattr(schema, "MAX_MEMBER_BYTES", 1000)
    big_json = _sample(id="u" * 2000)
    with pytest.raises(schema.SampleError, match=r"field 'json': 2,\d+ bytes, over the limit of 1,000"):
        schema.decode_seq(big_json)
    big_image = {**_sample(), schema.image_field(0): b"\xff\xd8" + bytes(2000)}
    with pytest.raises(schema.SampleError, match=r"field 'img0000.jpg': 2,002 bytes, over the limit"):
        schema.decode_seq(big_image)
    assert schema.decode_seq(big_image, images=False).items[0].image is None  # not read: not checked


def test_a_hostile_manifest_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / schema.MANIFEST_NAME).write_text('{"schema": 1,\n "counts": ' + DEEP + "}")
    with pytest.raises(InputError, match=rf"{tmp_path / schema.MANIFEST_NAME}:1: malformed JSON: nested too deeply"):
        schema.load_manifest(tmp_path)
