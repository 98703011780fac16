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
from typing import Any, Iterable

from contrastive.data.storage import (
    PIPE,
    basename,
    check_no_secrets,
    exists,
    expand,
    filesystem,
    is_remote,
    join,
    local_path,
    read_bytes,
    redact,
    write_bytes,
)
from contrastive.data.tar import MAX_MEMBER, iter_tar_members

log = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"
NSHARDS_FILE = "nshards.txt"  # CLIP_benchmark's WebDataset layout names its shards by number instead


class DataError(RuntimeError):
    """A dataset that cannot be used as configured; the message says what to change."""


@dataclass(frozen=True)
class Shard:
    path: str
    samples: int | None  # None: not counted (an evaluation set read whole, counted as it streams)

    @property
    def name(self) -> str:
        return basename(self.path)


def sample_key(member_name: str) -> tuple[str | None, str | None]:
    """Tar member name -> (sample key, extension), WebDataset's rule: the key ends at the first dot
    of the base name."""
    directory, _, base = member_name.rpartition("/")
    if "." not in base:
        return None, None
    key, ext = base.split(".", 1)
    return (f"{directory}/{key}" if directory else key), ext.lower()


def count_samples(path: str, *, max_member: int = MAX_MEMBER) -> int:
    """Number of samples in one shard, read from the tar headers only; a damaged tar raises
    tarfile.ReadError."""
    count, error = count_readable(path, max_member=max_member, strict=True)
    return count


def count_readable(path: str, *, max_member: int = MAX_MEMBER, strict: bool = False) -> tuple[int, str | None]:
    """(samples a shard's headers hold up to any damage, what the damage is or None). A damaged
    shard's count stops where its headers stop making sense: the loader reads that many and `verify`
    lists the shard (with `strict`, the damage is raised instead)."""
    count, last = 0, None
    try:
        for name, _ in iter_tar_members(path, max_member=max_member):
            key, _ = sample_key(name)
            if key is not None and key != last:
                count, last = count + 1, key
    except tarfile.ReadError as e:
        if strict:
            raise
        log.warning("shard %s is damaged after %d samples (%s): only those are counted", redact(path), count, e)
        return count, str(e)
    return count, None


def list_shards(spec: str | os.PathLike, *, num_samples: int = 0, count: bool = True) -> list[Shard]:
    """A dataset -> its shards (see `locate`) with their sample counts.

    Counts come from `sizes.json` beside the shards; where it does not list a shard, from
    `num_samples` (`data.train_num_samples`: the total, spread evenly over the shards, as open_clip
    assumes; a shard holding other counts is reported by the loader), or else from the shard's tar
    headers, read once, with a warning (slow for big datasets: `contrastive-data stats --write-sizes`):
    by rank 0 alone, its counts broadcast to the other ranks. With `count=False` (an evaluation set,
    which counts as it streams) such shards are left uncounted (None)."""
    spec = str(spec)
    check_no_secrets(spec, "data")
    try:
        locations, sizes_at = locate(spec)
    except FileNotFoundError as e:
        raise DataError(f"dataset {redact(spec)}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a store's own errors (unreachable, refused): named with the place
        raise DataError(f"dataset {redact(spec)}: {type(e).__name__}: {e}") from None
    if not locations:
        raise DataError(f"dataset {redact(spec)} holds no .tar shards")
    sizes: dict[str, Any] = {}
    try:
        sizes = _read_sizes(sizes_at) if sizes_at else {}
    except ValueError as e:
        log.warning("%s is unreadable (%s): counting samples from the shards instead", redact(sizes_at), e)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"dataset {redact(spec)}: {type(e).__name__}: {e}") from None
    unknown = [loc for loc in locations if not isinstance(sizes.get(basename(loc)), int)]
    estimate = {}
    if unknown and num_samples:
        log.warning(
            "%s: no sample counts for %d shards: spreading data.train_num_samples=%d over them (an exact "
            "epoch needs sizes.json: contrastive-data stats --write-sizes)",
            redact(spec),
            len(unknown),
            num_samples,
        )
        estimate = {
            loc: num_samples // len(unknown) + (i < num_samples % len(unknown)) for i, loc in enumerate(unknown)
        }
    elif unknown and count:
        log.warning(
            "%s: %s does not list %d of its %d shards: counting their samples (reads them once; write it "
            "with contrastive-data stats --write-sizes, or give data.train_num_samples)",
            redact(spec),
            SIZES_FILE,
            len(unknown),
            len(locations),
        )
    counted = estimate or (_count_on_main(spec, [loc for loc in locations if loc in unknown]) if count else {})
    shards = []
    for location in locations:
        n = sizes.get(basename(location))
        if not isinstance(n, int) or n < 0:
            n = counted.get(location)
        shards.append(Shard(location, n))
    return shards


def _count_on_main(spec: str, locations: list[str]) -> dict[str, int]:
    """Each shard's count from its headers, read by rank 0 alone; every rank gets the counts."""
    from contrastive.distributed import run_on_main, same_on_every_rank

    def count() -> dict[str, int]:
        counts = {}
        for location in locations:
            try:
                counts[location] = count_readable(location)[0]
            except OSError as e:
                raise DataError(f"dataset {redact(spec)}: cannot read {redact(location)}: {e}") from None
        return counts

    if not locations:
        return {}
    return same_on_every_rank(run_on_main(count, what=f"counting the samples of {redact(spec)}"))


def locate(spec: str | os.PathLike) -> tuple[list[str], str | None]:
    """(a dataset's shard locations in order, where its sizes.json is or would be; None for a pipe).

    `spec`: a local directory or .tar file; a URL of a directory (`s3://bucket/data/`,
    `https://host/data/`: its sizes.json names the shards, else an object store is listed) or of a
    .tar; a brace list (`.../part-{000000..000099}.tar`); pipe:COMMAND (braces expanded too). See
    contrastive.data.storage. Raises FileNotFoundError for a place that does not exist."""
    spec = str(spec)
    locations = expand(spec)
    if len(locations) > 1 or spec.startswith(PIPE):
        head = locations[0]
        return locations, None if head.startswith(PIPE) else join(head.rsplit("/", 1)[0], SIZES_FILE)
    if not is_remote(spec):
        path = Path(local_path(spec))
        if path.is_file() and path.suffix == ".tar":
            return [str(path)], str(path.parent / SIZES_FILE)
        if not path.is_dir():
            raise FileNotFoundError(f"{str(path)!r} does not exist (expected a directory of .tar shards)")
        return [str(p) for p in sorted(path.iterdir()) if p.suffix == ".tar"], str(path / SIZES_FILE)
    if spec.endswith(".tar"):
        return [spec], join(spec.rsplit("/", 1)[0], SIZES_FILE)
    sizes_at = join(spec, SIZES_FILE)
    if exists(sizes_at):
        return [join(spec, name) for name in sorted(_read_sizes(sizes_at))], sizes_at
    nshards_at = join(spec, NSHARDS_FILE)
    if exists(nshards_at):  # CLIP_benchmark's layout: 0.tar ... (n-1).tar
        n = read_bytes(nshards_at).decode().strip()
        if not n.isdigit():
            raise ValueError(f"{redact(nshards_at)} holds {n[:40]!r}, not a number of shards")
        return [join(spec, f"{i}.tar") for i in range(int(n))], sizes_at
    fs, path = filesystem(spec)
    if not fs.exists(path):
        raise FileNotFoundError(f"{redact(spec)} does not exist")
    protocol = spec.split("://", 1)[0]
    return [f"{protocol}://{p}" for p in sorted(fs.glob(f"{path.rstrip('/')}/*.tar"))], sizes_at


def _read_sizes(location: str) -> dict[str, Any]:
    if not exists(location):
        return {}
    sizes = json.loads(read_bytes(location))
    if not isinstance(sizes, dict):
        raise ValueError(f"{redact(location)} is not a JSON object")
    return sizes


def write_sizes(spec: str) -> tuple[dict[str, int], str, dict[str, str]]:
    """Counts every shard of a dataset from its headers and writes sizes.json beside them: (the
    counts, where they were written, the damaged shards and their damage: counted up to it)."""
    locations, sizes_at = locate(spec)
    if sizes_at is None:
        raise DataError(f"{redact(spec)}: a pipe has no place for a {SIZES_FILE}")
    if not locations:
        raise DataError(f"dataset {redact(spec)} holds no .tar shards")
    counted = {basename(location): count_readable(location) for location in locations}
    sizes = {name: n for name, (n, _) in counted.items()}
    write_bytes(sizes_at, (json.dumps(sizes, indent=1, sort_keys=True) + "\n").encode())
    return sizes, sizes_at, {name: error for name, (_, error) in counted.items() if error}


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

    def __init__(
        self, out_dir: str | os.PathLike, *, prefix: str = "shard", max_count: int = 1000, max_bytes: int = 1 << 30
    ):
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
