"""shards.tarread gives what webdataset's tarfile reader gives, sample for sample and error for error, on sound shards,
on shards with members it leaves to tarfile, and on shards cut or damaged anywhere."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from shards.pipeline import _SampleRange
from shards.tarread import tar_samples


def _sample_members(n: int) -> list[tuple[str, bytes]]:
    members = []
    for i in range(n):
        members.append((f"user{i:05d}.json", b'{"index": %d, "text": "%s"}' % (i, b"x" * (37 * i))))
        for j in range(i % 3 + 1):
            members.append((f"user{i:05d}.item_{j}.jpg", bytes((i * 7 + j + k) % 256 for k in range(300 + 211 * j))))
    return members


def _write(path: Path, members: list[tuple[str, bytes]], extra: dict[int, tarfile.TarInfo] | None = None) -> Path:
    """A tar of ``members`` (tarfile's default format, as wds.TarWriter writes), with ``extra`` headers (directories,
    links, long names) inserted before the member of that position."""
    extra = extra or {}
    with tarfile.open(path, "w") as tar:
        for pos, (name, data) in enumerate(members):
            if pos in extra:
                tar.addfile(extra[pos], io.BytesIO(b"x" * extra[pos].size) if extra[pos].isreg() else None)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return path


class Recorder:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def __call__(self, exn: Exception) -> bool:
        self.errors.append(type(exn).__name__)
        return True


def _both(path: Path, select_range: tuple[int, int] | None = None) -> tuple[tuple, tuple]:
    results = []
    for read in ("wds", "ours"):
        handler = Recorder()
        select = None if select_range is None else _SampleRange(*select_range)
        if read == "wds":
            samples = wds.tarfile_samples([{"url": str(path)}], handler=handler, select_files=select)
        else:
            samples = tar_samples(str(path), handler, select)
        got = [{k: v for k, v in s.items()} for s in samples]
        results.append((got, handler.errors, None if select is None else (select.index, select.key)))
    return results[0], results[1]


def test_sound_shards_read_the_same(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.tar", _sample_members(7))
    expected, ours = _both(path)
    assert ours == expected and len(expected[0]) == 7 and expected[1] == []
    for select_range in ((0, 3), (2, 5), (6, 7), (3, 3)):
        expected, ours = _both(path, select_range)
        assert ours == expected, select_range


def test_members_left_to_tarfile_read_the_same(tmp_path: Path) -> None:
    members = _sample_members(6)
    long_name = tarfile.TarInfo("user00002." + "long_" * 30 + ".jpg")  # over 100 characters: a pax header
    long_name.size = 10
    folder = tarfile.TarInfo("somedir")
    folder.type = tarfile.DIRTYPE
    link = tarfile.TarInfo("user00004.link.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "elsewhere"
    meta = tarfile.TarInfo("__meta__")
    meta.size = 10
    unicode = tarfile.TarInfo("user00005.ütf.jpg")
    unicode.size = 10
    for extra in ({3: long_name}, {1: folder}, {8: link}, {0: meta}, {10: unicode}, {2: folder, 9: long_name}):
        path = _write(tmp_path / "b.tar", members, extra)
        expected, ours = _both(path)
        assert ours == expected, extra
        expected, ours = _both(path, (1, 4))
        assert ours == expected, extra


@pytest.mark.parametrize("select_range", [None, (1, 4)])
def test_shards_cut_anywhere_read_the_same(tmp_path: Path, select_range) -> None:
    whole = _write(tmp_path / "whole.tar", _sample_members(5)).read_bytes()
    cut = tmp_path / "cut.tar"
    for length in [*range(0, 1030, 97), *range(1030, len(whole), 331), len(whole) - 1]:
        cut.write_bytes(whole[:length])
        expected, ours = _both(cut, select_range)
        assert ours == expected, length


@pytest.mark.parametrize("select_range", [None, (0, 2)])
def test_damaged_headers_read_the_same(tmp_path: Path, select_range) -> None:
    path = _write(tmp_path / "whole.tar", _sample_members(4))
    whole = path.read_bytes()
    with tarfile.open(path) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    headers = [offsets[0], offsets[1], offsets[len(offsets) // 2], offsets[-1]]
    damaged = tmp_path / "damaged.tar"
    for header in headers:
        for field, value in ((3, b"\xff"), (124, b"9"), (130, b"\0"), (148, b"7"), (150, b"x"), (156, b"2"),
                             (156, b"x"), (257, b"X"), (345, b"p"), (500, b"\x01")):  # fmt: skip
            data = bytearray(whole)
            data[header + field : header + field + len(value)] = value
            damaged.write_bytes(bytes(data))
            expected, ours = _both(damaged, select_range)
            assert ours == expected, (header, field, value)


def test_damaged_fields_under_a_checksum_that_holds_read_the_same(tmp_path: Path) -> None:
    """A header whose numbers tarfile rejects, though its checksum was made to hold (a crafted shard)."""
    path = _write(tmp_path / "whole.tar", _sample_members(4))
    whole = path.read_bytes()
    with tarfile.open(path) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    damaged = tmp_path / "damaged.tar"
    for header in (offsets[0], offsets[2], offsets[-1]):
        for field, value in ((100, b"9"), (108, b"z"), (116, b"8"), (124, b"\x80\0\0\0\0\0\0\0\0\0\x01\x00"),
                             (136, b"q"), (329, b"9"), (337, b"-"), (148, b"\xff")):  # fmt: skip
            data = bytearray(whole)
            data[header + field : header + field + len(value)] = value
            if field != 148:  # a checksum that holds: the header's unsigned sum, the field counted as spaces
                block = data[header : header + 512]
                block[148:156] = b" " * 8
                block[148:156] = b"%06o\0 " % sum(block)
                data[header : header + 512] = block
            damaged.write_bytes(bytes(data))
            expected, ours = _both(damaged)
            assert ours == expected, (header, field, value)


def test_a_size_beyond_the_shard_is_an_error_not_a_read_through_it(tmp_path: Path) -> None:
    """A base-256 size of 2**88 bytes: tarfile would read on through it, 10 KB at a time, for hours."""
    path = _write(tmp_path / "whole.tar", _sample_members(4))
    with tarfile.open(path) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    data = bytearray(path.read_bytes())
    block = data[offsets[3] : offsets[3] + 512]
    block[124:136] = b"\x80" + b"\xff" * 11
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    data[offsets[3] : offsets[3] + 512] = block
    path.write_bytes(bytes(data))
    handler = Recorder()
    samples = list(tar_samples(str(path), handler))
    assert handler.errors == ["ReadError"] and [s["__key__"] for s in samples] == ["user00000", "user00001"]


def test_a_missing_shard_reaches_the_handler(tmp_path: Path) -> None:
    handler = Recorder()
    assert list(tar_samples(str(tmp_path / "nowhere.tar"), handler)) == [] and handler.errors == ["FileNotFoundError"]
