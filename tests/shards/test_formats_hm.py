"""The H&M reader on hand-written Kaggle-layout files: leading zeros, day dates, repeats, images, bad input."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from test_build import all_samples, jpeg

from shards.build import BuildOptions, build
from shards.errors import InputError

ARTICLE_COLUMNS = (
    "article_id,product_code,prod_name,product_type_no,product_type_name,product_group_name,"
    "graphical_appearance_no,graphical_appearance_name,colour_group_code,colour_group_name,"
    "perceived_colour_value_id,perceived_colour_value_name,perceived_colour_master_id,perceived_colour_master_name,"
    "department_no,department_name,index_code,index_name,index_group_no,index_group_name,section_no,section_name,"
    "garment_group_no,garment_group_name,detail_desc"
).split(",")
TRANSACTIONS_HEADER = "t_dat,customer_id,article_id,price,sales_channel_id"
DAY = 1537401600.0  # 2018-09-20 00:00 UTC


def article(article_id: str, name: str, kind: str, colour: str, desc: str) -> list[str]:
    """A 25-column articles.csv row; the columns the template does not use get filler values."""
    given = {"article_id": article_id, "prod_name": name, "product_type_name": kind}
    given |= {"colour_group_name": colour, "detail_desc": desc}
    return [given.get(c, "7") for c in ARTICLE_COLUMNS]


ARTICLES = [
    article("0108775015", "Strap top", "Vest top", "Black", "Jersey top with narrow shoulder straps."),
    article("0108775044", "Strap top", "Vest top", "White", 'Top, with "straps".'),
    article("0200000001", "Sock", "Socks", "Grey", ""),
    article("0300000001", "Hat", "Hat/beanie", "", "Warm hat."),
]
TRANSACTIONS = [
    TRANSACTIONS_HEADER,
    "2018-09-21,c1,0200000001,0.01,2",
    "2018-09-20,c1,0108775044,0.02,1",
    "2018-09-20,c1,0108775015,0.02,1",  # same day as the line above: file order
    "2018-09-22,c1,0108775044,0.02,2",  # a repeat purchase
    "2018-09-20,c2,108775015,0.03,1",  # the leading zero lost (an integer round trip): padded back
    "2018-09-20,c2,0300000001,0.03,1",
    "2018-09-20,c2,0300000001,0.03,1",  # a repeat on the same day
]


def write_hm(folder: Path, articles: list, transactions: list[str | bytes], images: dict[str, bytes]) -> Path:
    """articles.csv (rows of cells, or raw bytes lines), transactions_train.csv, and images by relative path."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in [ARTICLE_COLUMNS, *articles]:
        if isinstance(row, bytes):
            lines.append(row)
        else:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="").writerow(row)
            lines.append(buf.getvalue().encode())
    (folder / "articles.csv").write_bytes(b"\n".join(lines) + b"\n")
    rows = [t.encode() if isinstance(t, str) else t for t in transactions]
    (folder / "transactions_train.csv").write_bytes(b"\n".join(rows) + b"\n")
    for rel, data in images.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def opts(**kw) -> BuildOptions:
    return BuildOptions(**{"format": "hm", "min_user_interactions": 3, "image_size": 32, **kw})


def test_ids_dates_repeats_and_images(tmp_path: Path) -> None:
    images = {"images/010/0108775015.jpg": jpeg((1, 2, 3)), "images/020/0200000001.jpg": jpeg((3, 2, 1))}
    folder = write_hm(tmp_path / "hm", ARTICLES, TRANSACTIONS, images)
    manifest = build(folder, tmp_path / "out", opts(), progress=False)
    assert manifest["skipped"] == [] and manifest["counts"]["interactions"] == 7
    items = {it.id: it for it in all_samples(tmp_path / "out", "items")}
    assert {k: it.text for k, it in items.items()} == {
        "0108775015": "Strap top. Vest top, Black. Jersey top with narrow shoulder straps.",
        "0108775044": 'Strap top. Vest top, White. Top, with "straps".',
        "0200000001": "Sock. Socks, Grey.",
        "0300000001": "Hat. Warm hat.",  # no colour: the type-and-colour part is left out whole
    }
    assert [k for k, it in items.items() if it.image is not None] == ["0108775015", "0200000001"]
    seqs = {s.id: s for s in all_samples(tmp_path / "out", "seqs")}
    c1, c2 = seqs["c1"], seqs["c2"]
    assert [c1.items[p].id for p in c1.seq] == ["0108775044", "0108775015", "0200000001", "0108775044"]
    assert c1.timestamps == (DAY, DAY, DAY + 86400, DAY + 2 * 86400)
    assert [c2.items[p].id for p in c2.seq] == ["0108775015", "0300000001", "0300000001"]


def test_images_argument(tmp_path: Path) -> None:
    folder = write_hm(tmp_path / "hm", ARTICLES, TRANSACTIONS, {"images/010/0108775015.jpg": jpeg((1, 2, 3))})
    elsewhere = tmp_path / "photos"
    (elsewhere / "030").mkdir(parents=True)
    (elsewhere / "030" / "0300000001.jpg").write_bytes(jpeg((9, 9, 9)))
    build(folder, tmp_path / "out", opts(images=str(elsewhere)), progress=False)
    items = all_samples(tmp_path / "out", "items")
    assert [it.id for it in items if it.image is not None] == ["0300000001"]


def test_bad_records_are_counted_skips(tmp_path: Path) -> None:
    transactions = [
        TRANSACTIONS_HEADER,
        "2018-09-20,c1,0108775015,0.1,1",
        "2018-13-01,c1,0108775044,0.1,1",  # 3: no month 13
        "20/09/2018,c1,0108775044,0.1,1",  # 4: not YYYY-MM-DD
        "2018-09-21,c1",  # 5: short row
        "2018-09-21,,0108775015,0.1,1",  # 6: no customer
        "2018-09-21,c1,0999999999,0.1,1",  # 7: unknown article
        b"2018-09-22,c\xe91,0108775015,0.1,1",  # 8: not UTF-8
        "2018-09-23,c1,0200000001,0.1,1",
        "2018-09-24,c1,0300000001,0.1,1",
    ]
    articles = [ARTICLES[0], b"0108775044,short", b"0200000002,Caf\xe9", ARTICLES[2], ARTICLES[3]]
    manifest = build(write_hm(tmp_path / "hm", articles, transactions, {}), tmp_path / "out", opts(), progress=False)
    skipped = {(s["file"], s["line"], s["field"]): s["reason"] for s in manifest["skipped"]}
    expect = {
        ("articles.csv", 3, None): "malformed row: 2 fields, header has 25",
        ("articles.csv", 4, None): "not UTF-8",
        ("transactions_train.csv", 3, "t_dat"): "malformed date: '2018-13-01'",
        ("transactions_train.csv", 4, "t_dat"): "malformed date: '20/09/2018'",
        ("transactions_train.csv", 5, None): "malformed row: 2 fields",
        ("transactions_train.csv", 6, "customer_id"): "empty value",
        ("transactions_train.csv", 7, "item"): "unknown item id: '0999999999'",
        ("transactions_train.csv", 8, None): "not UTF-8",
    }
    assert set(skipped) == set(expect), sorted(skipped.items(), key=str)
    for where, reason in expect.items():
        assert skipped[where].startswith(reason), (where, skipped[where])
    assert manifest["counts"]["interactions"] == 3


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: (d / "transactions_train.csv").unlink(), "missing transactions file 'transactions_train.csv'"),
        (lambda d: (d / "articles.csv").write_text("id,prod_name\n1,x\n"), "articles.csv:1: header"),
        (lambda d: (d / "transactions_train.csv").write_text("day,customer_id,article_id\n"), "lacks column.*t_dat"),
    ],
)
def test_unusable_input_is_a_clear_error(tmp_path: Path, setup, message: str) -> None:
    folder = write_hm(tmp_path / "hm", ARTICLES, TRANSACTIONS, {})
    setup(folder)
    with pytest.raises(InputError, match=message):
        build(folder, tmp_path / "out", opts(), progress=False)
