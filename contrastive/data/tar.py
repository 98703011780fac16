"""Reading tar shards member by member, whatever bytes they hold.

`iter_tar_members` reads the 512-byte headers itself (ustar, GNU long names, pax `path`/`size`
records: what tarfile, GNU tar and webdataset's writers produce) instead of building a
tarfile.TarInfo per member (~0.1 ms a member, a quarter of a loader worker's time on small samples).
Compressed tars (gzip, bzip2, xz) are decompressed as streams by the standard library and read by
the same parser, under the same bounds (tarfile's own parser lets malformed pax records through as
OverflowError and reads whatever size a pax record claims).

Every number a header holds is a claim the data makes, checked before it is used: a member's size
must be a non-negative number no larger than `max_member` (data.max_member_mb) and is read in
chunks, so memory follows the bytes the stream really holds, never the size a header names; pax
records and GNU long names are bounded (`MAX_META`) and each pax record must advance past its own
length field. So a damaged shard can neither hang the reader nor make it allocate what a header
says: any malformation raises `tarfile.ReadError` naming the byte offset, which the loader counts
as a broken shard (contrastive.data.sources.read_segments) and `contrastive-data verify` lists.

A reader that decodes a little of a large member (the window of a 10-minute clip) asks for members
over `lazy_over` bytes of a local file as `Span`s: the reader seeks past them, and the decoder reads
the bytes it needs from the file (a 7 MB FLAC costs what its window does, not a 7 MB read and copy).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import tarfile
import zlib
from typing import BinaryIO, Iterator

from contrastive.data.storage import open_shard

BLOCK = 512
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: read through tarfile
REGULAR = (b"0", b"\0", b"7")  # tar types of a regular file
META = b"xgLK"  # pax (local, global) and GNU long name / long link blocks
MAX_MEMBER = 1024 << 20  # bytes; data.max_member_mb's default
MAX_META = 1 << 20  # bytes of one pax or long-name block: far more than any real name or record set
CHUNK = 4 << 20  # a member larger than this is read piece by piece
LAZY_OVER = 1 << 20  # bytes: a local member larger than this is a Span, where the reader asks for them

# What the decompressors raise for damaged or truncated input (bzip2's "Invalid data stream" is a
# plain OSError, which the loader counts as a broken shard too).
DECOMPRESSION_ERRORS = (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


def iter_tar_members(
    source: str | BinaryIO, *, max_member: int = MAX_MEMBER, lazy_over: int = 0
) -> Iterator[tuple[str, bytes | Span]]:
    """(name, content) of each regular file of a tar, in order: `source` is a location (a path, a URL,
    pipe:COMMAND; see contrastive.data.storage) or an open buffered binary stream, read sequentially.
    With `lazy_over`, a member of more bytes in an uncompressed local file is a Span, not read.
    A damaged or truncated archive raises tarfile.ReadError (see the module docstring)."""
    if isinstance(source, (str, os.PathLike)):
        with open_shard(str(source)) as f:
            yield from iter_tar_members(f, max_member=max_member, lazy_over=lazy_over)
        return
    magic = source.peek(6)[:6]
    if not magic.startswith(COMPRESSED_MAGIC):
        yield from _members(source, max_member, lazy_over)
        return
    if magic.startswith(b"\x1f\x8b"):
        opened = gzip.GzipFile(fileobj=source, mode="rb")
    else:
        opened = bz2.BZ2File(source) if magic.startswith(b"BZh") else lzma.LZMAFile(source)
    try:
        with opened as f:
            yield from _members(f, max_member)
    except DECOMPRESSION_ERRORS as e:
        raise tarfile.ReadError(f"damaged compressed tar: {type(e).__name__}: {e}") from e


def _members(f: BinaryIO, max_member: int, lazy_over: int = 0) -> Iterator[tuple[str, bytes | Span]]:
    long_name, pax, offset, shared = None, {}, 0, None
    while True:
        header = f.read(BLOCK)
        if not header.strip(b"\0"):  # end-of-archive block(s), or the end of the file
            if offset == 0:
                raise tarfile.ReadError("empty file")
            return
        if len(header) < BLOCK:
            raise tarfile.ReadError(f"unexpected end of data: a header truncated at byte {offset + len(header)}")
        if _header_checksum(header) != _octal(header[148:156], offset):
            raise tarfile.ReadError(f"bad checksum in the header at byte {offset}")
        kind = header[156:157]
        if "size" in pax and kind not in META:
            size = _decimal(pax["size"], f"the pax size record before byte {offset}")
        else:
            size = _number(header[124:136], offset)
        limit = MAX_META if kind in META else max_member
        if size > limit:
            what = "pax/long-name block" if kind in META else "member"
            setting = "" if kind in META else f" (data.max_member_mb={max_member >> 20})"
            raise tarfile.ReadError(
                f"the {what} at byte {offset} claims {size} bytes, over the limit of {limit}{setting}"
            )
        left = _left_in_file(f) if lazy_over and size > lazy_over and kind in REGULAR else 0
        if left >= size > 0:  # a large member a local file holds whole: skipped over, read when decoded
            shared = shared or _SharedFile(os.dup(f.fileno()))
            content: bytes | Span = Span(shared, f.tell(), size)
            padding = min(-size % BLOCK, left - size)
            f.seek(size + padding, os.SEEK_CUR)
        else:
            content = _read(f, size)
            padding = len(f.read(-size % BLOCK))  # read apart, so that a member is never copied to drop it
        if len(content) < size:
            raise tarfile.ReadError(
                f"unexpected end of data: the member at byte {offset} claims {size} bytes, {len(content)} follow"
            )
        if kind == b"x":
            pax = _pax_records(content, offset + BLOCK)
        elif kind == b"L":
            long_name = content.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind not in b"gK":  # global pax headers and GNU long link names say nothing we use
            name = long_name or pax.get("path") or _ustar_name(header)
            long_name, pax = None, {}
            if kind in REGULAR and not (kind == b"\0" and name.endswith("/")):
                yield name, content
        offset += BLOCK + size + padding


def _read(f: BinaryIO, n: int) -> bytes:
    """Up to `n` bytes; a large `n` is read in chunks (and joined: one more copy), so that a short
    stream never costs `n` bytes of memory, unless a local file is known to hold them."""
    if n <= CHUNK or n <= _left_in_file(f):
        return f.read(n)
    parts, left = [], n
    while left:
        part = f.read(min(left, CHUNK))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


class Span:
    """`size` bytes of a local file from `offset`, not read yet: `open()` reads them as a file (what a
    decoder that seeks wants), `bytes(span)` whole. A file cut short since is an OSError on reading."""

    __slots__ = ("_file", "offset", "size")

    def __init__(self, file: _SharedFile, offset: int, size: int):
        self._file, self.offset, self.size = file, offset, size

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        data = os.pread(self._file.fd, self.size, self.offset)
        if len(data) < self.size:
            raise OSError(f"the member at byte {self.offset} was cut short since it was listed ({len(data)} bytes)")
        return data

    def open(self) -> io.RawIOBase:
        return _SpanReader(self._file.fd, self.offset, self.size)

    def __reduce__(self):  # pickled (sent to another process) as its bytes: the descriptor stays here
        return bytes, (bytes(self),)


class _SharedFile:
    """A descriptor of the shard the Spans of one reading share, closed with the last of them."""

    def __init__(self, fd: int):
        self.fd = fd

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except (OSError, TypeError):  # TypeError: `os` already torn down at interpreter exit
            pass


class _SpanReader(io.RawIOBase):
    def __init__(self, fd: int, offset: int, size: int):
        self.fd, self.offset, self.size, self.pos = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.size - self.pos))
        data = os.pread(self.fd, n, self.offset + self.pos) if n else b""
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        self.pos = max(0, pos + {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence])
        return self.pos

    def tell(self) -> int:
        return self.pos


def _left_in_file(f: BinaryIO) -> int:
    """Bytes from the position to the end of a local file read through a buffer (0 for a pipe, a
    socket, a decompressor: anything whose length is not the file's)."""
    if not (isinstance(f, io.BufferedReader) and isinstance(f.raw, io.FileIO) and f.seekable()):
        return 0
    return os.fstat(f.fileno()).st_size - f.tell()


def _header_checksum(header: bytes) -> int:
    return sum(header[:148]) + 8 * 32 + sum(header[156:])  # the checksum field counts as spaces


def _octal(field: bytes, offset: int) -> int:
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"invalid number {field!r} in the tar header at byte {offset}") from None


def _number(field: bytes, offset: int) -> int:
    """A size field: octal, or GNU base-256 (sizes of 8 GiB and more); never negative."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        if field[0] == 0o377:
            value -= 256 ** (len(field) - 1)
    else:
        value = _octal(field, offset)
    if value < 0:
        raise tarfile.ReadError(f"negative size {value} in the tar header at byte {offset}")
    return value


def _decimal(text: str, where: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise tarfile.ReadError(f"{where} is not a size: {text[:40]!r}")
    return int(text)


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    if prefix:
        name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    """`<length> <key>=<value>\\n` records, where `length` counts the whole record: each record
    must hold its own length field, its newline and an `=`, and end inside the block."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise tarfile.ReadError(f"malformed pax record at byte {offset + pos}: no length field")
        length = int(digits)
        end = pos + length
        if length < len(digits) + 3 or end > len(data) or data[end - 1] != 0x0A:  # "N k=\n" at the least
            raise tarfile.ReadError(f"malformed pax record at byte {offset + pos}: length {length} does not fit")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise tarfile.ReadError(f"malformed pax record at byte {offset + pos}: no '='")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records
