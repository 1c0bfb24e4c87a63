"""The pixelrec reader on tiny files in the publisher's layout (and a flat one), built into shards."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pytest
from PIL import Image

from shards import schema
from shards.build import BuildOptions, build
from shards.errors import InputError
from shards.inspect import read_shard

INFO_HEADER = ("item_id,view_number,comment_number,thumbup_number,share_number,coin_number,favorite_number,"
               "barrage_number,title,tag,description")  # fmt: skip
INFO_ROWS = [
    'i0,10,1,2,0,0,1,5,Cat video,"cats,funny","A cat, a box.\nPart two."',  # quoted comma and line break
    "i1,3,0,0,0,0,0,0,Dog video,,Dogs.",  # no tag
    "i2,1,0,0,0,0,0,0,,music,",  # no title
    "i3,1,0,0",  # malformed row
    ",1,0,0,0,0,0,0,No id,x,y",
]
INTERACTIONS = ["item_id,user_id,timestamp", "i0,u1,30", "i1,u1,10", "i2,u1,20", "i0,u2,5", "i1,u2,5", "i2,u2,7",
                "i1,u3,soon", "i1,,3"]  # fmt: skip


def jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (30, 20), (10, 120, 200)).save(out, "JPEG")
    return out.getvalue()


def write(path: Path, lines: list[str], gz: bool = False, bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = ("\ufeff" if bom else "").encode() + ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("layout", ["publisher", "flat"])
def test_pixelrec_round_trip(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "Pixel200K"
    if layout == "publisher":  # both CSVs named Pixel200K.csv, in separate folders
        info, inter = "pixelrec_iteminfo/Pixel200K.csv", "pixelrec_interaction/Pixel200K.csv"
        write(folder / info, [INFO_HEADER, *INFO_ROWS])
        write(folder / inter, INTERACTIONS)
    else:  # one folder, gzipped interactions, item info with a byte-order mark
        info, inter = "item_info.csv", "interactions.csv.gz"
        write(folder / info, [INFO_HEADER, *INFO_ROWS], bom=True)
        write(folder / inter, INTERACTIONS, gz=True)
    (folder / "cover").mkdir()
    (folder / "cover" / "i0.jpg").write_bytes(jpeg())
    out = tmp_path / "out"
    manifest = build(folder, out, BuildOptions(format="pixelrec", min_user_interactions=3, image_size=32),
                     progress=False)  # fmt: skip
    m = schema.load_manifest(out)
    items = {it.id: it for s in m.shards("items") for it in map(schema.decode_item, read_shard(out / s.name))}
    seqs = {sq.id: sq for s in m.shards("seqs") for sq in map(schema.decode_seq, read_shard(out / s.name))}
    assert {u: [s.items[p].id for p in s.seq] for u, s in seqs.items()} == {
        "u1": ["i1", "i2", "i0"], "u2": ["i0", "i1", "i2"]}  # fmt: skip
    assert seqs["u1"].timestamps == (10.0, 20.0, 30.0)
    assert items["i0"].text == "Cat video. Tags: cats,funny. A cat, a box. Part two."
    assert items["i1"].text == "Dog video. Dogs." and items["i2"].text == "Tags: music."
    assert items["i0"].image is not None and items["i1"].image is None
    info_name, inter_name = Path(info).name, Path(inter).name
    got = {(s["file"], s["line"], s["field"]): s["reason"] for s in manifest["skipped"]}
    assert got == {
        (info_name, 6, None): "malformed row: 4 fields, header has 11",
        (info_name, 7, "item_id"): "empty value",
        (inter_name, 8, "timestamp"): "malformed timestamp: 'soon'",
        (inter_name, 9, "user_id"): "empty value",
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("pixelrec_interaction/Pixel1M.csv", "one interactions CSV .* found pixelrec_interaction/Pixel1M.csv, "),
        (None, "one item info CSV .*item_id, title.* found none"),
    ],
)
def test_unusable_folders_are_clear_errors(tmp_path: Path, extra: str | None, message: str) -> None:
    folder = tmp_path / "Pixel"
    write(folder / "pixelrec_interaction" / "Pixel200K.csv", INTERACTIONS)
    if extra:
        write(folder / extra, INTERACTIONS)
        write(folder / "pixelrec_iteminfo" / "Pixel200K.csv", [INFO_HEADER, *INFO_ROWS])
    else:
        write(folder / "pixelrec_iteminfo" / "Pixel200K.csv", ["item_id,name", "i0,x"])  # no title column
    with pytest.raises(InputError, match=message):
        build(folder, tmp_path / "out", BuildOptions(format="pixelrec", min_user_interactions=3), progress=False)
