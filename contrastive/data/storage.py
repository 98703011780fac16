"""Where shards and checkpoints live: a local path, any fsspec URL (`s3://`, `gs://`, `http(s)://`...;
s3fs and gcsfs are the optional extras `contrastive[s3]`, `contrastive[gcs]`), or `pipe:COMMAND`
(webdataset's convention, opened by webdataset's own opener). Brace lists (`part-{000000..000099}.tar`)
expand to their shards.

Credentials come from where the libraries look for them (the environment, an AWS profile, gcloud's),
and an S3-compatible store's address from `AWS_ENDPOINT_URL` or `data.storage_options`: a URL or an
option that holds a secret is refused, since the config is saved with every run.

Shards are read as streams, in order, never copied to disk: `ShardStream` survives transient errors
(a reset connection, a timeout, HTTP 5xx, S3's SlowDown), retrying with exponential backoff and
reopening the source where it broke (a range read on object stores, and on web servers that take
`Range`; a server that ignores it, or a pipe, is restarted and its bytes up to there discarded), so
that no sample is repeated or lost; each retry is counted, and the first few of a shard are logged.
An HTTP stream resumes only the object it began reading: the first answer's ETag (or Last-Modified)
goes with the range request as `If-Range`, and an answer of another version (another validator, or
another total length in `Content-Range`) raises ObjectChanged instead of joining two versions' bytes.
A missing object, a missing bucket or a refused credential is no transient error: it is raised.
Reading a worker's next shards ahead in a thread is `contrastive.data.prefetch`.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from contrastive.credentials import location_secret, redact_location, secret_message

log = logging.getLogger("contrastive.data")

PIPE = "pipe:"
STORAGE_OPTIONS: dict[str, dict[str, Any]] = {}  # protocol -> fsspec keyword arguments (configure_storage)
RETRIES = 6  # attempts after the first failure, backoff doubling from BACKOFF seconds
BACKOFF = 0.2
CHUNK = 1 << 20  # bytes per read of a remote stream
PIECE = 64 << 10  # bytes per read of the source under it (what a broken connection can take with it)


class StorageError(OSError):
    """A location that cannot be read as asked (missing, refused): not worth a retry."""


class ObjectChanged(StorageError):
    """The object changed between two reads of one stream (another ETag, Last-Modified or length):
    its bytes cannot be joined; the shard is read again from its start (contrastive.data.sources)."""


@dataclass(frozen=True)
class Version:
    """What identifies one version of an HTTP object: its validators and its whole length."""

    etag: str | None
    modified: str | None
    length: int | None

    def differs(self, other: "Version") -> bool:
        pairs = ((self.etag, other.etag), (self.modified, other.modified), (self.length, other.length))
        return any(a is not None and b is not None and a != b for a, b in pairs)

    def if_range(self) -> str | None:
        """The If-Range validator (a strong ETag, else Last-Modified), None without one."""
        return self.etag if self.etag and not self.etag.startswith("W/") else self.modified


def local_path(location: str) -> str:
    """A local location as a path (a `file://` URL's path)."""
    return location.removeprefix("file://")


def is_remote(location: str) -> bool:
    return location.startswith(PIPE) or "://" in location and not location.startswith("file://")


def redact(location: str) -> str:
    """The location (or a message holding one) as logs may show it: see contrastive.credentials."""
    return redact_location(location)


def check_no_secrets(location: str, where: str) -> None:
    """A location that carries a credential (contrastive.credentials) is refused: locations are saved
    with every run and shown in its logs."""
    why = location_secret(location)
    if why:
        raise StorageError(secret_message([(where, why)], f"{where} ({redact(location)})"))


def configure_storage(options: Mapping[str, Mapping[str, Any]] | None) -> None:
    """fsspec keyword arguments per protocol (`{s3: {endpoint_url: ...}}`), resolved: a credential
    among them can only have come from the environment (`${oc.env:...}`; a literal one is refused
    with the config, contrastive.config.refuse_credentials), and is never written back."""
    for protocol, kwargs in (options or {}).items():
        STORAGE_OPTIONS[protocol] = dict(kwargs)


def filesystem(url: str):
    """(fsspec filesystem, path within it) for a URL, with the configured options."""
    import fsspec

    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return fsspec.core.url_to_fs(url, **STORAGE_OPTIONS.get(protocol, {}))


def expand(spec: str) -> list[str]:
    """A brace list's locations (`part-{000..009}.tar`), or the one location."""
    if "{" not in spec:
        return [spec]
    import braceexpand

    return list(braceexpand.braceexpand(spec))


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if "://" in base else os.path.join(base, name)


def basename(location: str) -> str:
    """The file name a location ends in: a shard's name (in counts, embeddings' file names, curation's
    outputs), unique and stable for each of a set's shards. A URL's path ends it (its query is no part
    of it). A pipe's is that of the last URL or path the command names a .tar by (`pipe:aws s3 cp
    s3://b/part-7.tar -` is part-7.tar, not `-`), else of its last word that is no option, else a
    digest of the command."""
    if location.startswith(PIPE):
        import hashlib
        import shlex

        try:
            words = shlex.split(location[len(PIPE) :])
        except ValueError:
            words = location[len(PIPE) :].split()
        named = [w for w in words if not w.startswith("-") and w.rstrip("/").split("?")[0].endswith(".tar")]
        named = named or [w for w in words[1:] if not w.startswith("-") and ("/" in w or "." in w)]
        if not named:
            return "pipe-" + hashlib.sha1(location.encode()).hexdigest()[:12] + ".tar"
        return basename(named[-1])
    tail = urlsplit(location).path if "://" in location else location
    return os.path.basename(tail.rstrip("/"))


def permanent(error: BaseException) -> bool:
    """An error no retry mends: a missing object or bucket, a refused credential, a bad request."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotImplementedError, StorageError)):
        return True
    status = getattr(error, "status", None) or getattr(error, "code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def _stream_filesystem(location: str):
    """The filesystem shards are streamed through. For S3, one that leaves retrying to ShardStream
    (s3fs and botocore would otherwise retry out of sight, uncounted): the same options, with
    botocore's attempts and s3fs's retries at one. For HTTP, a read timeout instead of a total one."""
    protocol = location.split("://", 1)[0]
    import fsspec

    if protocol in ("http", "https"):
        # aiohttp's default limits a whole request to 5 minutes, which a big shard on a slow link
        # exceeds every time; a stalled read is what to give up on (and retry)
        import aiohttp

        options = dict(STORAGE_OPTIONS.get(protocol, {}))
        client = dict(options.get("client_kwargs") or {})
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60))
        return fsspec.core.url_to_fs(location, **{**options, "client_kwargs": client})
    if protocol not in ("s3", "s3a"):
        return filesystem(location)

    options = dict(STORAGE_OPTIONS.get(protocol, {}))
    options["config_kwargs"] = {"retries": {"total_max_attempts": 1}, **(options.get("config_kwargs") or {})}
    fs, path = fsspec.core.url_to_fs(location, **options)
    fs.retries = 1
    return fs, path


def _open_raw(location: str, offset: int, version: Version | None = None):
    """(a binary stream of `location`, the offset it starts at, the HTTP object's version or None): a
    local file or an object store seek to `offset`; a pipe or a plain HTTP stream starts at 0. An HTTP
    stream opened again at `offset` asks for the rest only if the object is still `version`
    (If-Range), and raises ObjectChanged when the answer is of another version."""
    if location.startswith(PIPE):
        from webdataset.gopen import gopen

        return gopen(location, "rb"), 0, None
    if not is_remote(location):
        f = open(local_path(location), "rb", buffering=0)
        f.seek(offset)
        return f, offset, None
    fs, path = _stream_filesystem(location)
    if fs.protocol in ("http", "https") or "http" in fs.protocol:
        if not offset:
            f = fs.open(path, "rb", block_size=0)  # one GET, streamed
            return f, 0, _http_answer(f)[0]
        # where it broke, if the server takes a range and the object is the one read so far; else
        # from the start (the caller skips what it has, of the same version only)
        headers = {**(fs.kwargs.get("headers") or {}), "Range": f"bytes={offset}-"}
        if version is not None and version.if_range():
            headers["If-Range"] = version.if_range()
        f = fs.open(path, "rb", block_size=0, headers=headers)
        now, start = _http_answer(f)
        if version is not None and version.differs(now):
            f.close()
            raise ObjectChanged(f"{redact(location)} changed while it was read ({version} -> {now})")
        return f, offset if start == offset else 0, now
    f = fs.open(path, "rb", block_size=8 * CHUNK, cache_type="readahead")
    f.seek(offset)
    return f, offset, None


def _http_answer(f: Any) -> tuple[Version, int | None]:
    """(the version of the object an fsspec HTTP stream answers with, where its body starts: the first
    byte of a 206's Content-Range, None for a whole answer)."""
    from contrastive.adapters import http_status

    status, headers = http_status(f)
    headers = {k.lower(): v for k, v in headers.items()}
    start, length = None, headers.get("content-length")
    if status == 206:
        found = re.match(r"bytes (\d+)-\d+/(\d+|\*)", headers.get("content-range", ""))
        start = int(found.group(1)) if found else None
        length = found.group(2) if found and found.group(2) != "*" else None
    whole = int(length) if length and length.isdigit() else None
    return Version(headers.get("etag"), headers.get("last-modified"), whole), start


WARN_RETRIES = 3  # retries of one shard logged with their reason; later ones are counted only


class ShardStream(io.RawIOBase):
    """A shard's bytes in order, surviving transient errors (see the module docstring). `on_retry` is
    called once per retry."""

    def __init__(
        self,
        location: str,
        *,
        retries: int = RETRIES,
        backoff: float = BACKOFF,
        on_retry: Callable[[], None] | None = None,
    ):
        super().__init__()
        self.location, self.retries, self.backoff = location, retries, backoff
        self.on_retry = on_retry or (lambda: None)
        self.offset = 0  # bytes delivered
        self.version: Version | None = None  # of an HTTP object, from its first answer
        self._raw, self._at = None, 0
        self.retried = 0
        self._attempt(lambda: None)  # opened now: a missing object fails here

    def _open(self) -> None:
        self._close_raw()
        self._raw, self._at, version = _open_raw(self.location, self.offset, self.version)
        self.version = self.version or version

    def _close_raw(self) -> None:
        if self._raw is not None:
            try:
                self._raw.close()
            except Exception:  # noqa: BLE001 - a broken stream may fail to close; it is dropped anyway
                pass
            self._raw = None

    def _attempt(self, action: Callable[[], Any]) -> Any:
        for attempt in range(self.retries + 1):
            try:
                if self._raw is None:
                    self._open()
                return action()
            except Exception as e:  # noqa: BLE001 - classified: permanent ones raised, others retried
                if isinstance(e, OSError) and (permanent(e) or attempt == self.retries):
                    raise
                if permanent(e) or attempt == self.retries:  # as an OSError: what a shard's reader handles
                    raise StorageError(f"{redact(self.location)}: {type(e).__name__}: {e}") from e
                self.on_retry()
                self._close_raw()
                delay = self.backoff * 2**attempt * (0.5 + random.random())
                self.retried += 1
                if self.retried <= WARN_RETRIES:
                    log.warning(
                        "%s: %s: %s; retry %d of %d in %.1f s at byte %d%s",
                        redact(self.location),
                        type(e).__name__,
                        redact(str(e)),
                        attempt + 1,
                        self.retries,
                        delay,
                        self.offset,
                        " (further retries of this shard are counted in data/retries, not logged)"
                        if self.retried == WARN_RETRIES
                        else "",
                    )
                time.sleep(delay)

    def _read_some(self, n: int) -> bytes:
        while self._at < self.offset:  # a restarted stream: discard what was delivered already
            skipped = self._raw.read(min(CHUNK, self.offset - self._at))
            if not skipped:
                raise ConnectionError("the source ended before the point it broke at")
            self._at += len(skipped)
        # in pieces: a connection that breaks mid-read loses at most the piece in flight, not all of `n`
        data = self._raw.read(min(n, PIECE))
        if not data and hasattr(self._raw, "wait_for_child"):
            # a pipe's end: its command's exit status, waited for (webdataset only polls, and a command
            # that failed may not have been reaped yet, so that its failure would read as a short shard)
            self._raw.wait_for_child()
        self._at += len(data)
        return data

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._attempt(lambda: self._read_some(len(buffer)))
        buffer[: len(data)] = data
        self.offset += len(data)
        return len(data)

    def close(self) -> None:
        self._close_raw()
        super().close()


def open_shard(location: str, *, on_retry: Callable[[], None] | None = None) -> io.BufferedReader:
    """A buffered, retrying, sequential reader of a shard (a local file: a plain buffered file)."""
    if not is_remote(location):
        return open(local_path(location), "rb", buffering=CHUNK)
    return io.BufferedReader(ShardStream(location, on_retry=on_retry), buffer_size=CHUNK)


def read_bytes(location: str) -> bytes:
    if not is_remote(location):
        with open(local_path(location), "rb") as f:
            return f.read()
    fs, path = filesystem(location)
    return fs.cat_file(path)


def exists(location: str) -> bool:
    if not is_remote(location):
        return os.path.exists(local_path(location))
    fs, path = filesystem(location)
    return fs.exists(path)


def write_bytes(location: str, data: bytes) -> None:
    if not is_remote(location):
        with open(location, "wb") as f:
            f.write(data)
        return
    fs, path = filesystem(location)
    fs.pipe_file(path, data)


def upload_dir(local: str | os.PathLike, url: str) -> int:
    """Every file under `local` to the same relative place under `url`; returns the number of files."""
    from pathlib import Path

    fs, root = filesystem(url)
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    for path in files:
        fs.put_file(str(path), f"{root.rstrip('/')}/{path.relative_to(local)}")
    return len(files)
