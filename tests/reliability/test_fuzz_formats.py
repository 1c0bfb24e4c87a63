"""Fuzzing: random and mutated input lines fed to the source-format readers (through the whole shard build) and to
the shard sample decoder; every outcome is a clean result or a clear error (InputError / SampleError, which name
the file, line or sample and field), never another exception. Seeded by hypothesis' database-free derandomized
runs, so CI sees the same examples every time."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shards import schema
from shards.build import BuildOptions, build
from shards.errors import InputError

SEEDS: dict[str, dict[str, list[str]]] = {
    "generic": {
        "items.jsonl": [
            '{"id": "a", "title": "Red shoes", "tags": ["x", "y"], "year": 1999}',
            '{"id": 2, "title": "Blue hat", "image": "images/none.jpg"}',
            '{"id": "c", "title": "Green scarf"}',
        ],
        "interactions.csv": ["user,item,timestamp", "u1,a,1", "u1,2,2", "u1,c,3", "u2,a,5", "u2,c,6", "u2,2,7"],
    },
    "amazon2023": {
        "meta_Toys.jsonl": [
            '{"parent_asin": "A1", "title": "Ball", "description": ["Round", "<b>red</b>"], "features": ["soft"]}',
            '{"parent_asin": "A2", "title": "Kite", "categories": ["Outdoor"], "details": {"size": "L"}}',
            '{"parent_asin": "A3", "title": "Yo-yo", "store": "Acme"}',
        ],
        "Toys.jsonl": [
            json.dumps({"user_id": u, "parent_asin": a, "timestamp": t, "rating": 5.0})
            for t, (u, a) in enumerate([("u1", "A1"), ("u1", "A2"), ("u1", "A3"), ("u2", "A3"), ("u2", "A1")] * 2)
        ],
    },
    "recbole": {
        "ml.inter": ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
        + [f"u{u}\ti{i}\t4\t{10 * u + i}" for u in range(2) for i in range(4)],
        "ml.item": ["item_id:token\tmovie_title:token_seq\trelease_year:token"]
        + [f"i{i}\tMovie {i}\t199{i}" for i in range(4)],
    },
}

LINE = st.one_of(
    st.text(max_size=60),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
    st.sampled_from(["", "\t\t", ",,,", "{}", "[]", "null", '{"id": null}', '{"id": []}', "\ufeff", "\x00"]),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(["id", "title", "parent_asin", "user_id", "timestamp", "image", "description"]),
                inner,
                max_size=4,
            )
        ),  # fmt: skip
        max_leaves=6,
    ).map(lambda v: json.dumps(v, allow_nan=True)),
)


@st.composite
def mutated(draw, lines: list[str]) -> list[str]:
    """``lines`` with a few lines replaced, inserted, deleted or cut short."""
    out = list(lines)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "cut"]))
        at = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "insert" or not out:
            out.insert(at, draw(LINE))
        elif op == "replace":
            out[at] = draw(LINE)
        elif op == "delete":
            del out[at]
        else:
            out[at] = out[at][: draw(st.integers(0, len(out[at])))]
    return out


def _build(fmt: str, files: dict[str, list[str]]) -> None:
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        src = root / "src"
        src.mkdir()
        for name, lines in files.items():
            (src / name).write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
        opts = BuildOptions(format=fmt, min_user_interactions=3, image_size=8, samples_per_shard=4)
        try:
            manifest = build(src, root / "out", opts, progress=False)
        except InputError as e:
            assert str(e), "an InputError without a message"
            return
        assert manifest["counts"]["users"] >= 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("fmt", sorted(SEEDS))
def test_the_seed_inputs_build(fmt: str) -> None:
    """The unmutated seeds are valid: the fuzzing below starts from inputs that get far into the build."""
    _build(fmt, SEEDS[fmt])


FUZZ = settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("fmt", sorted(SEEDS))
@FUZZ
@given(data=st.data())
def test_mutated_source_files_build_or_fail_clearly(fmt: str, data) -> None:
    name = data.draw(st.sampled_from(sorted(SEEDS[fmt])))
    files = {**SEEDS[fmt], name: data.draw(mutated(SEEDS[fmt][name]))}
    _build(fmt, files)


SEQ_FIELDS = ["schema", "index", "id", "seq", "timestamps", "items"]


@st.composite
def seq_samples(draw) -> dict:
    """A valid sequence sample with some fields replaced by random JSON, or its bytes mangled."""
    seq = schema.Sequence(
        index=3, id="u3", items=(schema.Item(0, "a", "A", b"\xff\xd8jpg"), schema.Item(5, "b", None)), seq=(0, 1, 0)
    )
    raw = {**schema.encode_seq(seq), "__url__": "seqs-000000.tar"}
    meta = json.loads(raw["json"])
    for field in draw(st.lists(st.sampled_from(SEQ_FIELDS), max_size=3)):
        meta[field] = draw(st.recursive(st.none() | st.integers() | st.floats() | st.text(max_size=4) | st.booleans(),
                                        lambda x: st.lists(x, max_size=4) | st.dictionaries(st.text(max_size=5), x,
                                                                                             max_size=3)))  # fmt: skip
    data = json.dumps(meta).encode()
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.binary(max_size=6))
    return {**raw, "json": data}


@FUZZ
@given(raw=seq_samples())
def test_mangled_sequence_samples_decode_or_fail_clearly(raw: dict) -> None:
    try:
        seq = schema.decode_seq(raw)
    except schema.SampleError as e:
        assert "seqs-000000.tar" in str(e) and e.field
        return
    assert len(seq.seq) >= schema.MIN_SEQ_LEN and all(0 <= p < len(seq.items) for p in seq.seq)
