"""Fuzzing: random and mutated input lines fed to the source-format readers (through the whole shard build) and to
the shard sample decoder; every outcome is a clean result or a clear error (InputError / SampleError, which name
the file, line or sample and field), never another exception. Seeded by hypothesis' database-free derandomized
runs, so CI sees the same examples every time."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import shard_fixtures

from shards import schema
from shards.build import BuildOptions, build
from shards.errors import InputError

HM_BOUGHT = ("0108775015", "0200000001", "300000001")  # the last one lost its leading zero: padded back
UNISREC_HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token"
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
    "hm": {
        "articles.csv": [
            "article_id,prod_name,product_type_name,colour_group_name,detail_desc",
            '0108775015,Strap top,Vest top,Black,"Jersey top, narrow straps."',
            "0200000001,Sock,Socks,Grey,",
            '0300000001,Hat,Hat/beanie,,"Warm ""wool"" hat."',
        ],
        "transactions_train.csv": ["t_dat,customer_id,article_id,price,sales_channel_id"]
        + [f"2018-09-2{d},c{u},{a},0.01,1" for u in (1, 2) for d, a in enumerate(HM_BOUGHT)],
    },
    "microlens": {
        "toy_pairs.tsv": ["1\t10 20 30", "2\t30 10 20 20"],
        "toy_titles.csv": ["item,title", '10,"Hello, world"', '20,"He said ""hi"", then left"', "30,plain title"],
    },
    "mind": {
        "news.tsv": [f"N{i}\tsports\tgolf\tTitle {i}\tAbstract {i}.\thttps://x/{i}\t[]\t[]" for i in range(1, 5)],
        "behaviors.tsv": [
            "1\tU1\t11/15/2019 8:55:22 AM\tN1 N2\tN3-1 N4-0",
            "2\tU1\t11/14/2019 9:00:00 PM\tN1 N2\tN4-1",
            "3\tU2\t11/15/2019 10:00:00 AM\t\tN1-1 N2-1 N3-0 N4-1",
        ],
    },
    "pixelrec": {  # the publisher's layout: the two CSVs under one name in two folders
        "pixelrec_iteminfo/Pixel200K.csv": [
            "item_id,view_number,title,tag,description",
            'i0,10,Cat video,"cats,funny","A cat, a box."',
            "i1,3,Dog video,,Dogs.",
            "i2,1,,music,",
        ],
        "pixelrec_interaction/Pixel200K.csv": ["item_id,user_id,timestamp"]
        + [f"i{i},u{u},{10 * u + i}" for u in range(2) for i in range(3)],
    },
    "amazon2018": {
        "meta_Books.json": [
            '{"asin": "A", "title": "Alpha <b>Book</b> &amp; Co", "category": ["Books"], "description": ["One."]}',
            "{'asin': 'B', 'title': 'Beta', 'feature': ['soft'], 'description': \"It's good\"}",
            '{"asin": "C", "brand": "Cee", "imageURL": ["http://x/c.jpg"]}',
        ],
        "Books_5.json": [
            json.dumps({"reviewerID": u, "asin": a, "overall": 5.0, "unixReviewTime": t, "reviewText": "ok"})
            for t, (u, a) in enumerate([("u1", "A"), ("u1", "B"), ("u1", "C"), ("u2", "C"), ("u2", "A"), ("u2", "B")])
        ],
    },
    "amazon2018-ratings": {  # the 2014 release's header-less ratings CSV (user,item,rating,timestamp)
        "meta_Books.json": ['{"asin": "A", "title": "a"}', '{"asin": "B", "title": "b"}', '{"asin": "C"}'],
        "ratings_Books.csv": [f"u{u},{a},5.0,{t}" for u in (1, 2) for t, a in enumerate("ABC")],
    },
    "unisrec": {  # users 1: 1 2 3 4 and 2: 3 4 1 2, split by the publisher's rule; item indices -> ASINs
        "Toy.item": [
            "item_id:token\ttitle:token_seq\tbrand:token\tcategories:token_seq",
            "1\tRed &amp; shoes\tAcme\tShoes",
            "2\tBlue hat\t\tHats",
            "3\tGreen <b>scarf</b>\tBolt\t",
            "4\tYellow sock\tAcme\tSocks Wool",
        ],
        "Toy.train.inter": [UNISREC_HEADER, "1\t1\t2", "2\t3\t4"],
        "Toy.valid.inter": [UNISREC_HEADER, "1\t1 2\t3", "2\t3 4\t1"],
        "Toy.test.inter": [UNISREC_HEADER, "1\t1 2 3\t4", "2\t3 4 1\t2"],
        "Toy.item2index": [f"B00{i}\t{i}" for i in range(1, 5)],
    },
    "lcrec": {  # whole-file JSON objects, one member a line (as LC-Rec writes them, less the indentation)
        "Toy.inter.json": ["{", '  "u1": [1, 2, 3, 4],', '  "u2": ["5", "6", 1, 2]', "}"],  # items 3-6: one user
        "Toy.item.json": [
            "{",
            '  "1": {"title": "Red shoes", "brand": "AT&amp;T", "categories": "Shoes", "description": "<b>Red</b>"},',
            '  "2": {"title": "Blue hat", "brand": "", "categories": "Hats, Wool", "description": ""},',
            '  "3": {"title": "Green scarf", "description": "Warm."},',
            '  "4": {"title": "Yellow sock", "brand": "Acme", "extra": [1, {"a": null}]},',
            '  "5": {"title": "Purple tie", "categories": ""},',
            '  "6": {"title": "Grey belt", "brand": "B", "categories": "Belts", "description": "Leather &amp; steel."}',
            "}",
        ],
    },
}
ASSETS: dict[str, dict[str, bytes]] = {
    "hm": {"images/010/0108775015.jpg": shard_fixtures.tiny_jpeg((200, 30, 30))},
    "microlens": {"covers/10.jpg": shard_fixtures.tiny_jpeg((30, 200, 30))},
    "pixelrec": {"cover/i0.jpg": shard_fixtures.tiny_jpeg((30, 30, 200))},
    "amazon2018": {"images/A.jpg": shard_fixtures.tiny_jpeg((90, 90, 90))},
}
"""Files written as they are (never mutated): item images, so that the readers' image look-ups run."""
LINE_FORMATS = ("generic", "amazon2023", "recbole")
"""Fuzzed by whole-line mutations only (the first cases; their examples stay as they were)."""
RECORD_FORMATS = ("hm", "microlens", "mind", "pixelrec", "amazon2018", "amazon2018-ratings", "unisrec", "lcrec")
"""Fuzzed by whole-line mutations and by single cells (CSV, TSV) or JSON values replaced."""
WHOLE_OBJECT_FORMATS = ("lcrec",)
"""Files that are one JSON object, one member a line: a whole-line mutation mostly breaks the syntax (an error,
which is fine), so three examples in four mutate members instead (:func:`mutated_members`), keeping the braces and
commas so that the file still parses and the reader's own checks run."""


def format_of(case: str) -> str:
    """The format of a seed case ('amazon2018-ratings' is amazon2018 with a ratings file)."""
    return case.split("-")[0]


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
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def dates(draw) -> str:
    """Dates and times in the layouts the readers parse (H&M 'YYYY-MM-DD', MIND 'M/D/YYYY h:mm:ss AM'), with
    out-of-range parts: year 0, month 13, day 31 of February, hour 0 or 99."""
    y, m, d = draw(st.integers(0, 10000)), draw(st.integers(0, 13)), draw(st.integers(0, 32))
    h, mi, s = draw(st.integers(0, 99)), draw(st.integers(0, 60)), draw(st.integers(0, 60))
    if draw(st.booleans()):
        return f"{y:04d}-{m:02d}-{d:02d}"
    return f"{m}/{d}/{y:04d} {h}:{mi:02d}:{s:02d} {draw(st.sampled_from(['AM', 'PM', 'XM']))}"


TRICKY = ["", " ", "nan", "-inf", "1e400", "9" * 40, '"', '"a', 'a"b', "a\rb", "\x00", "\ufeff", "../x",
          "/etc/passwd", ".", "..", "N1-1 N2-", "-1", "N1-1-1", "x y\tz"]  # fmt: skip
CELL = st.one_of(st.text(max_size=12), st.integers().map(str), st.floats().map(repr), dates(), st.sampled_from(TRICKY))
"""One CSV or TSV cell: random text, numbers, dates, and the strings that trouble parsers."""


MEMBER = re.compile(r'(\s*"(?:[^"\\]|\\.)*"\s*:\s*)(.*?)(,?)\s*')
"""A member line of a whole-file JSON object (LC-Rec): its key, its value, its trailing comma."""


def _replace_member_value(draw, member: re.Match) -> str | None:
    """The member line with its value, one field of an object value or one element of a list value replaced by a
    random JSON value; None if the line holds no JSON value."""
    try:
        value = json.loads(member.group(2))
    except ValueError:
        return None
    if isinstance(value, dict) and value and draw(st.booleans()):
        value[draw(st.sampled_from(sorted(value)))] = draw(JSON_VALUE)
    elif isinstance(value, list) and value and draw(st.booleans()):
        value[draw(st.integers(0, len(value) - 1))] = draw(JSON_VALUE)
    else:
        value = draw(JSON_VALUE)
    return member.group(1) + json.dumps(value, allow_nan=True) + member.group(3)


def _replace_part(draw, line: str) -> str:
    """``line`` with one JSON value (a JSON object line, or a member line of a whole-file object) or one cell (tab-
    or comma-separated) replaced."""
    member = MEMBER.fullmatch(line)
    replaced = member and _replace_member_value(draw, member)
    if replaced:
        return replaced
    try:
        obj = json.loads(line)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and obj:
        obj[draw(st.sampled_from(sorted(obj)))] = draw(JSON_VALUE)
        return json.dumps(obj, allow_nan=True)
    sep = "\t" if "\t" in line else ","
    cells = line.split(sep)
    cells[draw(st.integers(0, len(cells) - 1))] = draw(CELL)
    return sep.join(cells)


@st.composite
def mutated(draw, lines: list[str], parts: bool = False) -> list[str]:
    """``lines`` with a few lines replaced, inserted, deleted or cut short; with ``parts``, also single cells or
    JSON values replaced (:data:`CELL`, :data:`JSON_VALUE`)."""
    out = list(lines)
    ops = ["replace", "insert", "delete", "cut", *(["part", "part"] if parts else [])]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(ops))
        at = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "insert" or not out:
            out.insert(at, draw(LINE))
        elif op == "replace":
            out[at] = draw(LINE)
        elif op == "delete":
            del out[at]
        elif op == "part":
            out[at] = _replace_part(draw, out[at])
        else:
            out[at] = out[at][: draw(st.integers(0, len(out[at])))]
    return out


MEMBER_KEY = st.one_of(st.text(max_size=6), st.sampled_from(["", " ", "1", "2", "u1", "u2"]))
"""A member name: random, or one the seeds use (a duplicate key)."""


@st.composite
def mutated_members(draw, lines: list[str]) -> list[str]:
    """A whole-file JSON object (``{``, one member a line, ``}``) with a few members' values (or one field of an
    object value, one element of a list value) replaced, members inserted, deleted or cut short; the commas between
    members and the braces are written afresh, so the file parses unless a cut broke a value."""
    out = [m.group(1) + m.group(2) for m in map(MEMBER.fullmatch, lines[1:-1]) if m]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["part", "part", "insert", "delete", "cut"]))
        at = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "insert" or not out:
            out.insert(at, f"  {json.dumps(draw(MEMBER_KEY))}: {json.dumps(draw(JSON_VALUE), allow_nan=True)}")
        elif op == "part":
            out[at] = _replace_part(draw, out[at])
        elif op == "delete":
            del out[at]
        else:
            out[at] = out[at][: draw(st.integers(0, len(out[at])))]
    return ["{", *(line + "," for line in out[:-1]), *out[-1:], "}"]


def build_case(case: str, files: dict[str, list[str]]) -> dict | InputError:
    """Write ``files`` (and the case's :data:`ASSETS`) into a fresh folder and build it: the manifest, or the
    clear :class:`InputError` it raised. Anything else raised fails the test. An error must name the input folder
    or one of its files; every skipped record must name an input file, and (images aside) its line."""
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        src = root / "src"
        for name, data in [*((n, "\n".join(lines).encode("utf-8", "surrogatepass")) for n, lines in files.items()),
                           *ASSETS.get(case, {}).items()]:  # fmt: skip
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(data)
        names = {Path(n).name for n in [*files, *ASSETS.get(case, {})]}
        opts = BuildOptions(format=format_of(case), min_user_interactions=3, image_size=8, samples_per_shard=4)
        try:
            manifest = build(src, root / "out", opts, progress=False)
        except InputError as e:
            message = str(e)
            assert str(src) in message or any(n in message for n in names), f"names no input: {message!r}"
            assert e.file is None or e.file in names, message
            return e
        assert manifest["counts"]["users"] >= 1
        for skip in manifest["skipped"]:
            assert skip["file"] in names, skip
            assert skip["field"] == "image" or (isinstance(skip["line"], int) and skip["line"] >= 1), skip
        return manifest
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("case", sorted(SEEDS))
def test_the_seed_inputs_build(case: str) -> None:
    """The unmutated seeds are valid and build without a skip: the fuzzing below starts from inputs that get far
    into the build."""
    manifest = build_case(case, SEEDS[case])
    assert isinstance(manifest, dict), manifest
    if case in RECORD_FORMATS:
        assert manifest["counts"]["users"] == 2 and manifest["skipped"] == [], manifest["skipped"]


FUZZ = settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _fuzz(case: str, data: st.DataObject, parts: bool) -> None:
    name = data.draw(st.sampled_from(sorted(SEEDS[case])))
    lines = SEEDS[case][name]
    by_member = case in WHOLE_OBJECT_FORMATS and data.draw(st.integers(0, 3)) > 0
    build_case(case, {**SEEDS[case], name: data.draw(mutated_members(lines) if by_member else mutated(lines, parts))})


@pytest.mark.parametrize("fmt", LINE_FORMATS)
@FUZZ
@given(data=st.data())
def test_mutated_source_files_build_or_fail_clearly(fmt: str, data: st.DataObject) -> None:
    _fuzz(fmt, data, parts=False)


@pytest.mark.parametrize("case", RECORD_FORMATS)
@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_mutated_records_build_or_fail_clearly(case: str, data: st.DataObject) -> None:
    _fuzz(case, data, parts=True)


@pytest.mark.parametrize(
    ("case", "name", "at", "line", "expect"),
    [  # what the fuzzer found (a raw csv.Error; a ValueError with no file or line), and its neighbours
        ("hm", "articles.csv", 1, "\r0", ("articles.csv", 2, None, "malformed row: a carriage return (\\r)")),
        ("hm", "articles.csv", 0, "\r0", "articles.csv:1: malformed header: a carriage return"),
        ("microlens", "toy_titles.csv", 2, "20,a\rb", ("toy_titles.csv", 3, None, "malformed row: a carriage")),
        ("pixelrec", "pixelrec_interaction/Pixel200K.csv", 0, "\r0", "expected one interactions CSV .* found none"),
        ("pixelrec", "pixelrec_interaction/Pixel200K.csv", 3, "i2,u0\r,2", ("Pixel200K.csv", 4, None, "malformed")),
        ("mind", "behaviors.tsv", 2, "3\tU2\t1/5/0000 1:00:00 AM\t\tN1-1", ("behaviors.tsv", 3, "time", "malformed")),
        ("mind", "behaviors.tsv", 1, "2\tU1\t2/30/2019 9:00:00 PM\t\tN4-1", ("behaviors.tsv", 2, "time", "malformed")),
    ],
)
def test_found_by_fuzzing(case: str, name: str, at: int, line: str, expect: tuple | str) -> None:
    """``line`` inserted before line ``at`` (0-based) of ``name``: a counted skip (file, line, field, reason) or a
    clear error."""
    lines = list(SEEDS[case][name])
    lines.insert(at, line)
    got = build_case(case, {**SEEDS[case], name: lines})
    if isinstance(expect, str):
        assert isinstance(got, InputError) and re.search(expect, str(got)), got
        return
    assert isinstance(got, dict), got
    skips = {(s["file"], s["line"], s["field"]): s["reason"] for s in got["skipped"]}
    assert skips.get(expect[:3], "").startswith(expect[3]), skips


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
