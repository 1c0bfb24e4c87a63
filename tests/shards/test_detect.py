"""``--format auto``: :func:`shards.formats.detect` tells each of the ten layouts from its file names (PixelRec from
its CSV headers), and says in one line what it found when it cannot."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from shards.__main__ import main
from shards.errors import InputError
from shards.formats import FORMATS, detect

PIXELREC_INFO = "item_id,view_number,comment_number,title,tag,description"
PIXELREC_INTER = "item_id,user_id,timestamp"
LAYOUTS: dict[str, dict[str, str]] = {  # one minimal folder per layout (a variant after a '/'): file -> content
    "generic": {"items.jsonl": "", "interactions.csv": "user,item,timestamp\n", "images/a.jpg": ""},
    "recbole": {"ml-100k.inter": "", "ml-100k.item": "", "posters/1.jpg": ""},
    "hm": {"transactions_train.csv": "t_dat,customer_id,article_id\n", "articles.csv": "article_id,prod_name\n"},
    "microlens": {"MicroLens-50k_pairs.tsv": "", "MicroLens-50k_titles.csv": "item,title\n"},
    "amazon2018": {"meta_Books.json": "", "Books_5.json": ""},
    "amazon2018/gz ratings": {"meta_Books.json.gz": "", "ratings_Books.csv": ""},
    "amazon2023": {"meta_Toys.jsonl": "", "Toys.jsonl": ""},
    "mind": {"behaviors.tsv": "", "news.tsv": ""},
    "mind/subfolder": {"MINDsmall_train/behaviors.tsv": "", "MINDsmall_train/news.tsv": ""},
    "pixelrec": {
        "pixelrec_iteminfo/Pixel200K.csv": PIXELREC_INFO + "\n",
        "pixelrec_interaction/Pixel200K.csv": PIXELREC_INTER + "\n",
    },
    "pixelrec/flat": {"item_info.csv": PIXELREC_INFO + "\n", "interactions.csv": PIXELREC_INTER + "\n"},
    "unisrec": {"Games.train.inter": "", "Games.valid.inter": "", "Games.test.inter": "", "Games.item": ""},
    "unisrec/text": {"Sci.valid.inter": "", "Sci.test.inter": "", "Sci.text": "", "Sci.item2index": ""},
    "lcrec": {"Office.inter.json": "", "Office.item.json": ""},
    "lcrec/gz": {"Office.inter.json.gz": "", "Office.item.json.gz": ""},
}


def write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        data = content.encode()
        (folder / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return folder


def test_every_format_has_a_layout_here() -> None:
    assert {case.split("/")[0] for case in LAYOUTS} == set(FORMATS)


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_each_layout_is_detected(tmp_path: Path, case: str) -> None:
    assert detect(write(tmp_path / "data", LAYOUTS[case])) == case.split("/")[0]


def test_unknown_folder_lists_what_was_found_and_the_formats(tmp_path: Path) -> None:
    folder = write(tmp_path / "data", {"notes.txt": "", "data.bin": "", "sub/x.csv": "a,b\n"})
    with pytest.raises(InputError) as e:
        detect(folder)
    message = str(e.value)
    assert message == (
        f"cannot tell the format of {folder}: found data.bin, notes.txt, sub; pass --format, one of "
        + ", ".join(sorted(FORMATS))
    )
    assert "\n" not in message


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"cannot tell the format of .*empty: found nothing; pass --format"):
        detect(tmp_path / "empty")
    with pytest.raises(InputError, match=r"input folder .*nope does not exist"):
        detect(tmp_path / "nope")


def test_long_listings_are_cut(tmp_path: Path) -> None:
    folder = write(tmp_path / "data", {f"f{n:02d}.txt": "" for n in range(15)})
    with pytest.raises(InputError, match=r"found f00.txt, .*, f11.txt and 3 more; pass --format"):
        detect(folder)


@pytest.mark.parametrize(
    ("files", "candidates"),
    [
        ({**LAYOUTS["generic"], **LAYOUTS["hm"]}, "generic, hm"),
        ({"Toy.inter": "", "Toy.item": "", "Toy.valid.inter": "", "Toy.test.inter": ""}, "recbole, unisrec"),
        ({**LAYOUTS["lcrec"], **LAYOUTS["amazon2023"], **LAYOUTS["pixelrec"]}, "lcrec, amazon2023, pixelrec"),
    ],
)
def test_ambiguous_folder_names_the_candidates(tmp_path: Path, files: dict[str, str], candidates: str) -> None:
    folder = write(tmp_path / "data", files)
    with pytest.raises(InputError) as e:
        detect(folder)
    message = str(e.value)
    assert message.startswith(f"{folder} fits several formats ({candidates}); pass one with --format (found ")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("files", "closest"),
    [
        ({"interactions.csv": "user,item,timestamp\n"}, "generic (lacks items.jsonl)"),
        ({"Games.test.inter": "", "Games.item": ""}, "recbole (lacks *.inter), unisrec (lacks *.valid.inter)"),
        ({"Office.inter.json": ""}, "lcrec (lacks *.item.json or *.item.json.gz)"),
        ({"articles.csv": "", "x_titles.csv": ""}, "hm (lacks transactions_train.csv), microlens (lacks *_pairs.tsv)"),
        ({"toy.item": ""}, "recbole (lacks *.inter)"),
    ],
)
def test_partial_folder_names_the_closest_format(tmp_path: Path, files: dict[str, str], closest: str) -> None:
    folder = write(tmp_path / "data", files)
    with pytest.raises(InputError, match=re.escape(f"; closest: {closest}; pass --format")):
        detect(folder)


def test_cli_build_without_format_detects_or_fails_in_one_line(tmp_path: Path, capsys) -> None:
    unknown = write(tmp_path / "unknown", {"notes.txt": ""})
    assert main(["build", "--input", str(unknown), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot tell the format of {unknown}: found notes.txt; pass --format, one of ")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    lcrec = tmp_path / "lcrec"
    lcrec.mkdir()
    (lcrec / "T.inter.json").write_text(json.dumps({"u1": [1, 2, 3], "u2": [3, 2, 1]}))
    (lcrec / "T.item.json").write_text(json.dumps({str(i): {"title": f"Item {i}"} for i in (1, 2, 3)}))
    assert main(["build", "--input", str(lcrec), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "domain 'lcrec' (lcrec)" in out and "split: published by the source files (intact)" in out
