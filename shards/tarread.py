"""Reading a shard's tar members: the headers of plain members parsed here, everything else by Python's ``tarfile``.

``tarfile`` in stream mode (what ``webdataset`` reads shards with) spends about 90 us of Python per member on its
header; a sequence sample holds a member per item image, so that was a quarter of a stream worker's CPU
(``python -m benchmarks.stream``). :func:`tar_samples` gives what ``webdataset.tarfile_samples`` gives for one local
shard, with the same errors reaching the same handler, and reads the members this module knows (a regular file with
a ustar or GNU header, a checksum that holds, an ASCII name, an octal size) in a few microseconds each. At the first
member it does not know, it hands the rest of the shard to ``webdataset``'s ``tarfile`` reader, from that member on;
a damaged header, a cut member or anything odd at the start of a shard goes the same way, so whatever ``tarfile``
makes of it (an error counted by the handler, or the archive's silent end at a bad header past the first) is what
the stream sees. A header that ``tarfile`` would reject past the first member ends the archive here too, silently,
as ``tarfile`` does. One difference, on purpose: a member whose base-256 size claims more bytes than the shard holds
(``tarfile`` would read on through up to 2**88 bytes, 10 KB at a time, for hours) is an error to the handler.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable, Iterator
from typing import IO, Any

from webdataset.tariterators import group_by_keys, meta_prefix, meta_suffix, tar_file_iterator

BLOCK = tarfile.BLOCKSIZE
_REGULAR = (b"0", b"\0")
_SKIP_META = re.compile(r"__[^/]*__($|/)")
"""webdataset's default ``skip_meta``: members named like ``__x__`` are not content."""


class _Unknown(Exception):
    """A member this module does not parse: ``tarfile`` reads the shard from it on."""


class _End(Exception):
    """A header ``tarfile`` would reject past the first member: the archive ends there, silently."""


def tar_samples(
    url: str, handler: Callable[[Exception], bool], select_files: Callable[[str], bool] | None = None
) -> Iterator[dict[str, Any]]:
    """The samples of the local tar file ``url``, as ``webdataset.tarfile_samples([{"url": url}], handler=handler,
    select_files=select_files)`` gives them (members of one key grouped, ``__key__`` and ``__url__`` set, members
    ``select_files`` refuses passed over unread); the file is closed when the iterator is."""
    return group_by_keys(_files(url, handler, select_files), handler=handler)


def _files(url: str, handler: Callable[[Exception], bool], select_files: Callable[[str], bool] | None) -> Iterator:
    """What ``webdataset``'s ``url_opener`` + ``tar_file_expander`` give for one local shard: member dicts with
    ``__url__``, then ``{}`` at the shard's end; an error opening or reading the shard goes to ``handler``."""
    try:
        f = open(url, "rb")  # noqa: SIM115 (closed below, and when the generator is closed)
    except Exception as exn:
        exn.args = exn.args + (url,)
        if handler(exn):
            return
        raise
    with f:
        try:
            for member in _members(f, handler, select_files):
                member["__url__"] = url
                yield member
            yield {}
        except Exception as exn:
            exn.args = exn.args + (f, url)
            if not handler(exn):
                return


def _members(f: IO[bytes], handler: Callable[[Exception], bool], select: Callable[[str], bool] | None) -> Iterator:
    """``{"fname", "data"}`` of each selected regular member, in order, as webdataset's ``tar_file_iterator``."""
    length = os.fstat(f.fileno()).st_size
    offset = 0  # of the header read next
    while True:
        header = f.read(BLOCK)
        try:
            name, size, regular = _parse(header)
        except _End:
            if offset == 0:  # tarfile raises at the first header (an empty or damaged shard): it says what
                break
            return
        except _Unknown:
            try:  # tarfile's own verdict on the header: past the first, one it rejects ends the archive silently
                size = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape").size
            except tarfile.HeaderError:
                if offset == 0:
                    break
                return
            if size > length:  # tarfile would read on through up to 2**88 bytes, 10 KB at a time: hours
                raise tarfile.ReadError(f"member at byte {offset} claims {size} bytes, more than the shard's {length}")
            break
        if size is None:  # the end-of-archive block
            return
        end = offset + BLOCK + -(-size // BLOCK) * BLOCK
        if end > length:  # cut inside the member or its padding: tarfile raises, at the member or the shard level
            break
        if regular and _content(name) and (select is None or select(name)):
            data = f.read(size)
            yield {"fname": name, "data": data}
        f.seek(end)
        offset = end
    f.seek(offset)
    yield from tar_file_iterator(f, handler=handler, select_files=select)


def _content(name: str) -> bool:
    """Not a webdataset meta member (skipped by ``tar_file_iterator`` before ``select_files``)."""
    meta = "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix)
    return not meta and not _SKIP_META.match(name)


_NUMBERS = ((124, 136), (100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))
"""The header's numeric fields, as tarfile parses them: size first, then mode, uid, gid, mtime, devmajor, devminor."""


def _octal(field: bytes) -> int:
    """A numeric header field as tarfile's ``nti`` reads it: octal digits up to a NUL, blanks stripped; one it
    rejects is :class:`_End`, a base-256 one :class:`_Unknown`."""
    if field[:1] in (b"\x80", b"\xff"):
        raise _Unknown
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise _End from None


def _parse(header: bytes) -> tuple[str, int | None, bool]:
    """(name, size, is a regular file) of a member header; size None for an end-of-archive block. Raises
    :class:`_End` where ``tarfile`` rejects the header (past the first member it then ends the archive), and
    :class:`_Unknown` for a valid header this module leaves to ``tarfile``."""
    if len(header) < BLOCK:
        raise _End
    if header.count(0) == BLOCK:
        return "", None, False
    checksum = _octal(header[148:156])
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32  # the checksum field counts as 8 spaces
    if checksum != unsigned and checksum != unsigned - 256 * sum(b >= 128 for b in header[:148] + header[156:]):
        raise _End  # neither tarfile's unsigned nor its signed sum
    kind, magic = header[156:157], header[257:265]
    if magic not in (b"ustar\x0000", b"ustar  \0") or kind not in (*_REGULAR, b"5"):
        raise _Unknown  # pax and GNU long names, links, devices: tarfile's
    if magic == b"ustar\x0000" and header[345:500].strip(b"\0"):
        raise _Unknown  # a ustar name prefix
    raw = header[:100].split(b"\0", 1)[0]
    if not raw.isascii():
        raise _Unknown
    numbers = [_octal(header[start:stop]) for start, stop in _NUMBERS]  # tarfile parses them all
    size = numbers[0]
    name = raw.decode("ascii")
    regular = kind in _REGULAR and not (kind == b"\0" and name.endswith("/"))
    return name, size if regular else 0, regular
