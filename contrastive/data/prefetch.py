"""A worker's next remote shards read ahead in a thread, so that request latency hides behind the
shards being parsed; at most 2 x `prefetch_bytes` held (the rest of the shard being parsed, and the
next one). Local shards are opened in place."""

from __future__ import annotations

import io
import queue
import threading
from typing import Any, Callable, Iterable, Iterator

from contrastive.data.storage import CHUNK, ShardStream, is_remote, open_shard


class _Queued(io.RawIOBase):
    """The reading end of a prefetched shard: chunks from the reader thread, then its end or error."""

    def __init__(self, chunks: "queue.Queue", cancel: threading.Event):
        super().__init__()
        self.chunks, self.cancel, self.pending, self.done = chunks, cancel, b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending and not self.done:
            item = self.chunks.get()
            if item is None:
                self.done = True
            elif isinstance(item, BaseException):
                self.done = True
                raise item
            else:
                self.pending = item
        n = min(len(buffer), len(self.pending))
        buffer[:n], self.pending = self.pending[:n], self.pending[n:]
        return n

    def close(self) -> None:
        self.cancel.set()  # the reader thread drops the rest of this shard and goes on to the next
        super().close()


def _put(items: "queue.Queue", item: Any, *stops: threading.Event) -> bool:
    """Puts unless one of `stops` is set while the queue is full; False when stopped."""
    while not any(s.is_set() for s in stops):
        try:
            items.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def prefetched(
    locations: Iterable[str], *, prefetch_bytes: int, on_retry: Callable[[], None] | None = None
) -> Iterator[tuple[str, io.BufferedReader]]:
    """(location, reader) for each location in order, remote ones read ahead by a thread: request
    latency is hidden behind the shards being parsed. At most 2 x `prefetch_bytes` are held: a bounded
    queue of CHUNK-sized reads per shard, for the shard being parsed and the next one, which is opened
    as soon as the current one is read through."""
    stop = threading.Event()
    slots = max(2, prefetch_bytes // CHUNK)
    shards: "queue.Queue" = queue.Queue(maxsize=1)

    def reader(remote: list[str]) -> None:
        for location in remote:
            chunks: "queue.Queue" = queue.Queue(maxsize=slots)
            cancel = threading.Event()  # set when the consumer closes the shard before its end
            if not _put(shards, (location, chunks, cancel), stop):
                return
            try:
                with ShardStream(location, on_retry=on_retry) as stream:
                    while True:
                        data = stream.read(CHUNK)
                        if not data or not _put(chunks, data, stop, cancel):
                            break
                _put(chunks, None, stop, cancel)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which reports the shard
                _put(chunks, e, stop, cancel)

    items = list(locations)
    remote = [location for location in items if is_remote(location)]
    thread = threading.Thread(target=reader, args=(remote,), daemon=True) if remote else None
    if thread is not None:
        thread.start()
    try:
        for location in items:
            if not is_remote(location):
                yield location, open_shard(location)
                continue
            _, chunks, cancel = shards.get()
            yield location, io.BufferedReader(_Queued(chunks, cancel), buffer_size=CHUNK)
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=5)
