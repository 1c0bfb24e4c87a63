"""The shard builder on hand-written generic domains: round trip, bad input, determinism, atomicity."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards import schema
from shards.__main__ import main
from shards.build import BuildOptions, build
from shards.errors import InputError
from shards.images import reencode
from shards.inspect import read_shard, summary, verify
from shards.transforms import crop_pixels, decode_image

REPO = Path(__file__).resolve().parents[2]


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "JPEG")
    return out.getvalue()


def write_domain(folder: Path, items: list, interactions: list[str], images: dict[str, bytes] | None = None) -> Path:
    """A generic-format folder; ``items`` are dicts (JSON lines) or raw bytes lines."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = [it if isinstance(it, bytes) else json.dumps(it).encode() for it in items]
    (folder / "items.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (folder / "interactions.csv").write_bytes(b"\n".join(x.encode() if isinstance(x, str) else x for x in interactions))
    for name, data in (images or {}).items():
        (folder / name).write_bytes(data)
    return folder


def clean_domain(folder: Path) -> Path:
    """4 users, 5 items (one text-only, one image-only); u1 has timestamp ties."""
    items = [
        {"id": "a", "title": "Alpha", "genre": ["x", "y"], "image": "images/a.jpg"},
        {"id": "b", "title": "Beta", "image": "images/b.jpg"},
        {"id": "c", "title": "Gamma"},
        {"id": "d", "image": "images/d.jpg"},
        {"id": "e", "title": "Epsilon", "image": "images/e.jpg"},
    ]
    rows = ["user,item,timestamp"]
    rows += ["u1,c,30", "u1,a,10", "u1,b,20", "u1,d,20", "u1,e,40"]  # b before d: equal time, file order
    rows += ["u2,a,1", "u2,b,2", "u2,a,3", "u2,c,4"]  # a repeat
    rows += ["u3,e,5", "u3,d,6", "u3,c,7"]
    rows += ["u4,a,1", "u4,b,2"]  # too short for leave-one-out: filtered
    imgs = {
        f"images/{k}.jpg": jpeg(c, (300, 200))
        for k, c in zip("abde", [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)])
    }
    return write_domain(folder, items, rows, imgs)


def small_opts(**kw) -> BuildOptions:
    return BuildOptions(
        **{"format": "generic", "min_user_interactions": 3, "image_size": 64, "samples_per_shard": 2, **kw}
    )


def all_samples(folder: Path, kind: schema.ShardKind) -> list:
    m = schema.load_manifest(folder)
    decode = schema.decode_item if kind == "items" else schema.decode_seq
    return [decode(raw) for s in m.shards(kind) for raw in read_shard(folder / s.name)]


def test_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = build(clean_domain(tmp_path / "dom"), out, small_opts(), progress=False)
    assert verify(out) == []
    assert manifest["counts"] | {"before_filtering": None} == {
        "users": 3, "items": 5, "interactions": 12, "items_text_and_image": 3, "items_text_only": 1,
        "items_image_only": 1, "items_without_content": 0, "before_filtering": None,
    }  # fmt: skip
    items = {it.id: it for it in all_samples(out, "items")}
    assert [it.index for it in items.values()] == list(range(5))
    assert items["a"].text == "Alpha. x, y." and items["c"].image is None and items["d"].text is None
    assert Image.open(io.BytesIO(items["a"].image)).size == (64, 64)  # the central square (--image-fit crop)
    seqs = {s.id: s for s in all_samples(out, "seqs")}
    assert set(seqs) == {"u1", "u2", "u3"}
    u1 = seqs["u1"]
    assert [u1.items[p].id for p in u1.seq] == ["a", "b", "d", "c", "e"]
    assert u1.timestamps == (10.0, 20.0, 20.0, 30.0, 40.0)
    u2 = seqs["u2"]
    assert [it.id for it in u2.items] == ["a", "b", "c"] and u2.seq == (0, 1, 0, 2)  # a repeat stored once
    assert u2.items[0] == items["a"]  # inline content equals the catalog's
    # popularity counts training positions only (last two of each user are eval targets)
    pop = dict(zip([it.id for it in items.values()], manifest["popularity"]))
    assert pop == {"a": 2, "b": 2, "c": 0, "d": 1, "e": 1}


def _thirds(size: tuple[int, int]) -> bytes:
    """A PNG whose left, middle and right thirds are red, green and blue."""
    img = Image.new("RGB", size, (0, 255, 0))
    third = size[0] // 3
    img.paste((255, 0, 0), (0, 0, third, size[1]))
    img.paste((0, 0, 255), (size[0] - third, 0, size[0], size[1]))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _colors(data: bytes, columns: list[int]) -> list[str]:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    names = {0: "red", 1: "green", 2: "blue"}
    return [names[max(range(3), key=img.getpixel((x, img.height // 2)).__getitem__)] for x in columns]


def test_image_fit_crop_keeps_the_central_square_and_contain_the_whole_image() -> None:
    wide = _thirds((300, 200))  # the central 200 x 200: red 50-100, green 100-200, blue 200-250
    crop = reencode(wide, 64, 95)
    assert Image.open(io.BytesIO(crop)).size == (64, 64)
    assert _colors(crop, [4, 32, 60]) == ["red", "green", "blue"] and _colors(crop, [20, 44]) == ["green", "green"]
    contain = reencode(wide, 64, 95, fit="contain")
    assert Image.open(io.BytesIO(contain)).size == (64, 43)
    assert _colors(contain, [10, 32, 54]) == ["red", "green", "blue"] and _colors(contain, [25, 39]) == ["green"] * 2
    small = _thirds((45, 30))  # crop enlarges the square once (else the stream would at every batch); contain never
    assert Image.open(io.BytesIO(reencode(small, 64, 95))).size == (64, 64)
    assert Image.open(io.BytesIO(reencode(small, 64, 95, fit="contain"))).size == (45, 30)
    square = reencode(_thirds((64, 64)), 64, 95)  # already the size: only re-encoded
    assert Image.open(io.BytesIO(square)).size == (64, 64)
    assert _colors(square, [5, 32, 58]) == ["red", "green", "blue"]
    with pytest.raises(ValueError, match="image fit"):
        reencode(wide, 64, 95, fit="pad")
    with pytest.raises(InputError, match="image_fit"):
        small_opts(image_fit="pad")


def test_the_stream_sees_the_same_square_from_either_fit() -> None:
    """Center-crop then scale is scale then center-crop: a crop-built image gives the stream (at the build's size or
    below) the square a contain-built one gives, without resampling it at the build's size."""
    x = np.linspace(0, 1, 300)[None, :, None]
    y = np.linspace(0, 1, 200)[:, None, None]
    smooth = (255 * np.concatenate([x * np.ones_like(y), y * np.ones_like(x), (x + y) / 2], axis=2)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="PNG")
    for size in (64, 32):
        crop = crop_pixels(decode_image(reencode(buf.getvalue(), 64, 95), size), size).float()
        contain = crop_pixels(decode_image(reencode(buf.getvalue(), 64, 95, fit="contain"), size), size).float()
        assert (crop - contain).abs().mean() < 3  # of 255: JPEG and resampling rounding, not another region


def test_every_bad_input_is_a_counted_skip(tmp_path: Path) -> None:
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg((1, 2, 3)))
    items = [
        {"id": "a", "title": "Alpha", "image": "images/a.jpg"},
        {"id": "b", "title": "Beta", "image": "images/broken.jpg"},  # corrupt image
        {"id": "c", "title": "Gamma", "image": "../secret.jpg"},  # outside the input folder
        {"id": "a", "title": "Again"},  # duplicate id
        b'{"id": "d", "title": ',  # malformed JSON
        b'{"id": "e", "title": "caf\xe9"}',  # Latin-1, not UTF-8
        {"id": "f", "title": {"nested": 1}, "plot": "Plot"},  # field of the wrong type
        {"title": "no id"},
        {"id": "g", "title": "Gee", "image": "images/missing.jpg"},
    ]
    rows = ["user,item,timestamp", "u1,a,1", "u1,b,2", "u1,c,3", "u1,zzz,4", "u1,f,5", "u1,g,6", "u1,a,x",
            "u1,a", b"u1,b,7\xff", "u1,c,"]  # fmt: skip
    folder = write_domain(
        tmp_path / "dom", items, rows, {"images/a.jpg": jpeg((5, 5, 5)), "images/broken.jpg": b"\xff\xd8junk"}
    )
    manifest = build(folder, tmp_path / "out", small_opts(), progress=False)
    skipped = {(s["file"], s["line"], s["field"]): s["reason"] for s in manifest["skipped"]}
    expect = {
        ("broken.jpg", None, "image"): "unreadable image",
        ("items.jsonl", 3, "image"): "image path outside the input folder",
        ("items.jsonl", 4, "id"): "duplicate item id: 'a'",
        ("items.jsonl", 5, None): "malformed JSON",
        ("items.jsonl", 6, None): "not UTF-8",
        ("items.jsonl", 7, "title"): "wrong type: expected text",
        ("items.jsonl", 8, "id"): "missing or not a string",
        ("items.jsonl", 9, "image"): "image not found",
        ("interactions.csv", 5, "item"): "unknown item id: 'zzz'",
        ("interactions.csv", 8, "timestamp"): "malformed timestamp",
        ("interactions.csv", 9, None): "malformed row: 2 fields",
        ("interactions.csv", 10, None): "not UTF-8",
        ("interactions.csv", 11, "timestamp"): "malformed timestamp",
    }
    assert set(skipped) == set(expect), sorted(skipped.items(), key=str)
    for where, reason in expect.items():
        assert skipped[where].startswith(reason), (where, skipped[where])
    assert sum(manifest["skipped_counts"].values()) == len(expect)
    items = {it.id: it for it in all_samples(tmp_path / "out", "items")}
    # items whose image failed are kept, marked text-only; the wrongly typed field is left out of the text
    assert items["b"].modalities == ("text",) and items["c"].modalities == ("text",)
    assert items["f"].text == "Plot." and items["a"].text == "Alpha."
    assert verify(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: (d / "items.jsonl").unlink(), "missing items file 'items.jsonl'"),
        (lambda d: (d / "interactions.csv").write_text("usr,item\nu1,a\n"), "interactions.csv:1: header"),
        (lambda d: (d / "interactions.csv").write_text(""), "interactions.csv:1: empty file"),
        (lambda d: (d / "items.jsonl").write_text("[1]\n"), "no readable item"),
    ],
)
def test_unusable_input_is_a_clear_error(tmp_path: Path, setup, message: str) -> None:
    folder = clean_domain(tmp_path / "dom")
    setup(folder)
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        build(folder, tmp_path / "out", small_opts(), progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_reports_user_mistakes_without_traceback(tmp_path: Path, capsys) -> None:
    assert main(["build", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert main(["build", "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--min-user-interactions", "2"]) == 2
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "does not exist" in err and "at least 3" in err and "no manifest" in err


def test_build_is_deterministic(tmp_path: Path) -> None:
    folder = clean_domain(tmp_path / "dom")
    for name in ("one", "two"):
        build(folder, tmp_path / name, small_opts(workers=2 if name == "two" else 1), progress=False)
    one, two = sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "two").iterdir())
    assert [p.name for p in one] == [p.name for p in two]
    manifest_two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest_two["options"]["workers"] == 2
    for a, b in zip(one, two):
        if a.name != "manifest.json":  # the manifest records the worker count; everything else is byte-identical
            assert a.read_bytes() == b.read_bytes(), a.name
    build(folder, tmp_path / "three", small_opts(), progress=False)
    assert (tmp_path / "one" / "manifest.json").read_bytes() == (tmp_path / "three" / "manifest.json").read_bytes()


def test_k_core_and_truncation(tmp_path: Path) -> None:
    items = [{"id": k, "title": k} for k in "abcdefg"]
    rows = ["user,item,timestamp"]
    rows += [f"u1,{k},{t}" for t, k in enumerate("abcdefg")]  # 7: truncated to the newest 5 = c d e f g
    rows += [f"u2,{k},{t}" for t, k in enumerate("cdefx")]  # x unknown -> 4 left
    rows += [f"u3,{k},{t}" for t, k in enumerate("cde")]
    manifest = build(write_domain(tmp_path / "d", items, rows), tmp_path / "o",
                     small_opts(max_seq_len=5, min_item_interactions=2), progress=False)  # fmt: skip
    seqs = {s.id: [s.items[p].id for p in s.seq] for s in all_samples(tmp_path / "o", "seqs")}
    # g is seen once -> dropped; u1 keeps c d e f (4); u3 keeps c d e
    assert seqs == {"u1": list("cdef"), "u2": list("cdef"), "u3": list("cde")}
    assert manifest["counts"]["before_filtering"]["interactions_beyond_max_seq_len"] == 2
    assert manifest["counts"]["items"] == 4


def test_verify_finds_tampering(tmp_path: Path) -> None:
    out = tmp_path / "out"
    build(clean_domain(tmp_path / "dom"), out, small_opts(), progress=False)
    shard = out / "seqs-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    (out / "seqs-000009.tar").write_bytes(b"")
    (out / "items-000001.tar").unlink()
    problems = verify(out)
    assert any("seqs-000000.tar: checksum" in p for p in problems)
    assert any("seqs-000009.tar: shard not listed" in p for p in problems)
    assert any("items-000001.tar: missing" in p for p in problems)
    assert main(["verify", str(out)]) == 1


def test_inspect_shows_counts_and_a_sample(tmp_path: Path) -> None:
    build(clean_domain(tmp_path / "dom"), tmp_path / "out", small_opts(), progress=False)
    text = summary(tmp_path / "out")
    assert "users 3  items 5  interactions 12" in text and "first item:" in text and "JPEG 64x64" in text


def test_inspect_into_a_closed_pipe_stops_quietly(tmp_path: Path) -> None:
    build(clean_domain(tmp_path / "dom"), tmp_path / "out", small_opts(), progress=False)
    proc = subprocess.Popen([sys.executable, "-m", "shards", "inspect", str(tmp_path / "out")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # the reader is gone before the first line (`| head -0`)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and b"Traceback" not in err, err.decode()


_CRASHING_BUILD = """
import os, signal, sys
from shards import build, schema
real, n = schema.encode_seq, [0]
def encode_then_die(seq):
    n[0] += 1
    if n[0] == 2:  # mid-way through the sequence shards
        os.kill(os.getpid(), signal.SIGKILL)
    return real(seq)
build.schema.encode_seq = encode_then_die
build.build(sys.argv[1], sys.argv[2], build.BuildOptions(min_user_interactions=3, samples_per_shard=1),
            overwrite=True, progress=False)
"""


@pytest.mark.parametrize("existing", [False, True])
def test_killed_build_leaves_no_complete_looking_output(tmp_path: Path, existing: bool) -> None:
    folder, out = clean_domain(tmp_path / "dom"), tmp_path / "out"
    if existing:
        build(folder, out, small_opts(), progress=False)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_CRASHING_BUILD), str(folder), str(out)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)  # fmt: skip
    assert proc.returncode == -9, proc.stderr.decode()
    if existing:  # the old build is untouched
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert not out.exists()
        with pytest.raises(InputError, match="no manifest"):
            schema.load_manifest(out)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert leftovers and not (leftovers[0] / "manifest.json").exists()


def test_synthetic_round_trip(tmp_path: Path) -> None:
    """Every source record of a synthetic domain comes back out of the shards, in chronological order."""
    from shards.synth import synthesize

    (src,) = synthesize(tmp_path / "src", domains=["books"], users_per_domain=12, items_per_domain=24, n_topics=4)
    out = tmp_path / "out"
    manifest = build(src, out, small_opts(samples_per_shard=5), progress=False)
    assert verify(out) == []
    source_items = [json.loads(line) for line in (src / "items.jsonl").read_text().splitlines()]
    rows = [line.split(",") for line in (src / "interactions.csv").read_text().splitlines()[1:]]
    items = {it.id: it for it in all_samples(out, "items")}
    assert set(items) == {it["id"] for it in source_items}
    for record in source_items:
        item = items[record["id"]]
        assert (item.image is not None) == ("image" in record)
        assert item.text == (
            None
            if "title" not in record
            else " ".join(
                v if v.endswith((".", "!", "?")) else v + "." for k, v in record.items() if k not in ("id", "image")
            )
        )
    counts = manifest["counts"]
    assert counts["items_text_only"] == sum("image" not in r for r in source_items)
    assert counts["items_image_only"] == sum("title" not in r for r in source_items)
    assert counts["interactions"] == len(rows)
    expected: dict[str, list[tuple[float, int, str]]] = {}
    for order, (user, item, stamp) in enumerate(rows):
        expected.setdefault(user, []).append((float(stamp), order, item))
    for seq in all_samples(out, "seqs"):
        events = sorted(expected[seq.id])
        assert [seq.items[p].id for p in seq.seq] == [item for _, _, item in events]
        assert seq.timestamps == tuple(t for t, _, _ in events)


@pytest.mark.parametrize(
    "value",
    ["[" * 100_000 + "]" * 100_000, "[" * 600 + "]" * 600, "9" * 5000],
    ids=["nested-100000", "nested-600", "5000-digits"],
)
def test_json_lines_too_deep_or_too_long_are_counted_skips(tmp_path: Path, value: str) -> None:
    """The decoder's RecursionError (or the int-conversion ValueError), or a depth the recursive text cleaning
    would overflow on, is one counted skip of that line, not a traceback."""
    items = [f'{{"id": "x", "title": {value}}}', '{"id": "a", "title": "A"}', '{"id": "b", "title": "B"}',
             '{"id": "c", "title": "C"}']  # fmt: skip
    folder = tmp_path / "dom"
    folder.mkdir()
    (folder / "items.jsonl").write_text("\n".join(items) + "\n")
    (folder / "interactions.csv").write_text("user,item\nu,a\nu,b\nu,c\n")
    manifest = build(folder, tmp_path / "out", small_opts(), progress=False)
    assert manifest["skipped_counts"] == {"malformed JSON": 1} and manifest["counts"]["items"] == 3
    assert manifest["skipped"][0]["line"] == 1
