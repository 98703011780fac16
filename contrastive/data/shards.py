"""The shard format (the public data contract), and reading and writing datasets in it.

A dataset is a directory of WebDataset `.tar` shards plus `sizes.json`, which maps each shard's file
name to its number of samples. One sample is the tar members that share a key (the file name up to
its first dot): `__key__` plus any of an image (jpg, jpeg, png, webp), audio (flac, wav, mp3, ogg),
text (txt) and metadata (json, e.g. {"label": "seven"}). A sample may lack any modality.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"


class DataError(RuntimeError):
    """A dataset that cannot be used as configured; the message says what to change."""


@dataclass(frozen=True)
class Shard:
    path: str
    samples: int

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def sample_key(member_name: str) -> tuple[str | None, str | None]:
    """Tar member name -> (sample key, extension), WebDataset's rule: the key ends at the first dot
    of the base name."""
    directory, _, base = member_name.rpartition("/")
    if "." not in base:
        return None, None
    key, ext = base.split(".", 1)
    return (f"{directory}/{key}" if directory else key), ext.lower()


BLOCK = 512
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: read through tarfile
REGULAR = (b"0", b"\0", b"7")  # tar types of a regular file


def iter_tar_members(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each regular file of the tar at `path`, in order.

    Reads the 512-byte headers itself (ustar, GNU long names, pax `path`/`size` records: what tarfile,
    GNU tar and webdataset's writers produce) instead of building a tarfile.TarInfo per member:
    ~0.1 ms a member, a quarter of a loader worker's time on small samples. Compressed tars go
    through tarfile. A bad header or a truncated member raises tarfile.ReadError, as tarfile does."""
    with open(path, "rb", buffering=1 << 20) as f:
        if f.peek(6)[:6].startswith(COMPRESSED_MAGIC):
            yield from _tarfile_members(path)
            return
        long_name, pax, offset = None, {}, 0
        while True:
            header = f.read(BLOCK)
            if not header.strip(b"\0"):  # end-of-archive block(s), or the end of the file
                if offset == 0:
                    raise tarfile.ReadError("empty file")
                return
            if len(header) < BLOCK:
                raise tarfile.ReadError("unexpected end of data (truncated header)")
            if _header_checksum(header) != _octal(header[148:156]):
                raise tarfile.ReadError(f"bad checksum in the header at byte {offset}")
            kind = header[156:157]
            size = int(pax["size"]) if "size" in pax and kind not in b"xgLK" else _number(header[124:136])
            content = f.read(size + -size % BLOCK)
            if len(content) < size:
                raise tarfile.ReadError("unexpected end of data")
            offset += BLOCK + len(content)
            if kind == b"x":
                pax = _pax_records(content[:size])
            elif kind == b"L":
                long_name = content[:size].rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif kind not in b"gK":  # global pax headers and GNU long link names say nothing we use
                name = long_name or pax.get("path") or _ustar_name(header)
                long_name, pax = None, {}
                if kind in REGULAR and not (kind == b"\0" and name.endswith("/")):
                    yield name, content[:size]


def _tarfile_members(path: str) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if member.isreg():
                yield member.name, tar.extractfile(member).read()


def _header_checksum(header: bytes) -> int:
    return sum(header[:148]) + 8 * 32 + sum(header[156:])  # the checksum field counts as spaces


def _octal(field: bytes) -> int:
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"invalid number {field!r} in a tar header") from None


def _number(field: bytes) -> int:
    if field[0] in (0o200, 0o377):  # GNU base-256, for sizes of 8 GiB and more
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    return _octal(field)


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    if prefix:
        name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """`<length> <key>=<value>\\n` records."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def count_samples(path: str) -> int:
    """Number of samples in one shard, read from the tar headers only."""
    count, last = 0, None
    for name, _ in iter_tar_members(path):
        key, _ = sample_key(name)
        if key is not None and key != last:
            count, last = count + 1, key
    return count


def list_shards(path: str | os.PathLike) -> list[Shard]:
    """A dataset directory (or one .tar file) -> its shards with their sample counts.

    Counts come from `sizes.json`; when it is missing or does not list a shard, the shard's tar
    headers are counted instead, with a warning (slow for big datasets: write sizes.json)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".tar":
        return [Shard(str(path), count_samples(str(path)))]
    if not path.is_dir():
        raise DataError(f"dataset {str(path)!r} does not exist (expected a directory of .tar shards)")
    tars = sorted(p for p in path.iterdir() if p.suffix == ".tar")
    if not tars:
        raise DataError(f"dataset {str(path)!r} holds no .tar shards")
    sizes: dict[str, Any] = {}
    sizes_path = path / SIZES_FILE
    if sizes_path.exists():
        try:
            sizes = json.loads(sizes_path.read_text())
            if not isinstance(sizes, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            log.warning("%s is unreadable (%s): counting samples from the shards instead", sizes_path, e)
            sizes = {}
    shards = []
    for tar in tars:
        n = sizes.get(tar.name)
        if not isinstance(n, int) or n < 0:
            if sizes_path.exists() and sizes:
                log.warning("%s does not list %s: counting its samples", sizes_path, tar.name)
            n = count_samples(str(tar))
        shards.append(Shard(str(tar), n))
    if not sizes:
        log.warning("%s has no usable %s: counted the samples of its %d shards", path, SIZES_FILE, len(tars))
    return shards


def _members(sample: dict[str, Any]) -> list[tuple[str, bytes]]:
    key = sample["__key__"]
    if "." in os.path.basename(key):
        raise ValueError(f"sample key {key!r} holds a dot: the key ends at the first dot of a member name")
    members = []
    for ext, value in sample.items():
        if ext.startswith("__"):
            continue
        if isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        if isinstance(value, str):
            value = value.encode("utf-8")
        members.append((f"{key}.{ext}", value))
    return members


def _add(tar: tarfile.TarFile, members: list[tuple[str, bytes]]) -> None:
    for name, value in members:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(value), 0, 0o644
        info.uname = info.gname = "contrastive"
        tar.addfile(info, io.BytesIO(value))


def write_shard(path: str | os.PathLike, samples: Iterable[dict[str, Any]]) -> int:
    """Writes one shard of `samples` ({"__key__": str, ext: bytes | str | dict}); returns the count.
    Byte-for-byte deterministic for the same samples (fixed member times and owners)."""
    n = 0
    with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            _add(tar, _members(sample))
            n += 1
    return n


class ShardWriter:
    """Writes samples ({"__key__": str, ext: bytes | str | dict}) into numbered shards and, on close,
    `sizes.json`. A new shard starts after `max_count` samples or `max_bytes` bytes. Output is
    byte-for-byte deterministic for the same input."""

    def __init__(self, out_dir: str | os.PathLike, *, prefix: str = "shard", max_count: int = 1000,
                 max_bytes: int = 1 << 30):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_count, self.max_bytes = prefix, max_count, max_bytes
        self.sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._name = ""
        self._count = self._bytes = 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _next_shard(self) -> None:
        self._close_tar()
        self._name = f"{self.prefix}-{len(self.sizes):06d}.tar"
        self._tar = tarfile.open(self.out_dir / self._name, mode="w", format=tarfile.USTAR_FORMAT)
        self.sizes[self._name] = 0
        self._count = self._bytes = 0

    def write(self, sample: dict[str, Any]) -> None:
        members = _members(sample)
        size = sum(len(v) for _, v in members)
        if self._tar is None or self._count >= self.max_count or (self._count and self._bytes + size > self.max_bytes):
            self._next_shard()
        _add(self._tar, members)
        self._count += 1
        self._bytes += size
        self.sizes[self._name] += 1

    def write_all(self, samples: Iterable[dict[str, Any]]) -> None:
        for sample in samples:
            self.write(sample)

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def close(self) -> None:
        self._close_tar()
        (self.out_dir / SIZES_FILE).write_text(json.dumps(self.sizes, indent=1, sort_keys=True) + "\n")
