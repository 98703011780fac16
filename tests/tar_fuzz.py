"""A seeded, structure-aware tar mutator and a harness that runs each mutated archive through the
shard reader in a child process under a wall-clock bound and a memory limit.

    cases = Fuzz(bases, seed=0)                     # bases: real tar shards' bytes
    data, how = cases.case(i)                       # case i, the same for every run with that seed
    results = run_cases(bases, seed=0, indices=range(4000), memory_mb=512, seconds=5.0)

A case mutates a real shard where damage hurts: header bytes (with the checksum made right again, so
the damage reaches the fields behind it), size fields (octal, GNU base-256, negative, 2^60, past
the end), inserted pax records and GNU long-name blocks with malformed or enormous lengths, type
flags, truncations, duplicated and deleted blocks, and gzip compression over all of it. Each case
ends as one of: `ok` (members read), `read_error` (tarfile.ReadError: the loader counts the shard as
broken), `counted` (OSError or EOFError: counted as well), `uncounted` (any other exception: it
would end a run), `memory` (MemoryError under the
limit), `timeout` (no answer within the bound: a hang) or `crash` (the child died).

Run as a script, it is the child: `python tar_fuzz.py CHILD_ARGS_JSON` (tests/fuzz_harness.py).
"""

from __future__ import annotations

import gzip
import io
import json
import random
import sys
import tarfile
from pathlib import Path
from typing import Iterable

from fuzz_harness import limit_memory, run_in_children, serve_cases

BLOCK = 512
HERE = Path(__file__).resolve().parent
GOOD = ("ok", "read_error", "counted")

# Size-field values that have hurt tar readers: empty, block edges, past the end, the largest
# octal field, 8 GiB (base-256 starts), 2^60, negative base-256, and text that is no number.
INTERESTING_SIZES = [0, 1, 511, 512, 513, 10**6, 8**11 - 1, 2**33, 2**60, -1, -(2**40), "garbage", "   ", "9" * 11]


def checksum(header: bytearray) -> None:
    """Writes a valid checksum into a 512-byte header (so the damage reaches what follows it)."""
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)


def size_field(value) -> bytes:
    if isinstance(value, str):
        return value.encode()[:12].ljust(12, b"\0")
    if 0 <= value < 8**11:
        return b"%011o\0" % value
    if value >= 0:
        return b"\x80" + value.to_bytes(11, "big")
    return b"\xff" + (256**11 + value).to_bytes(11, "big")  # GNU base-256, two's complement


def header_block(name: bytes, size, kind: bytes) -> bytes:
    h = bytearray(BLOCK)
    h[: len(name[:100])] = name[:100]
    h[100:108] = b"0000644\0"
    h[124:136] = size_field(size)
    h[136:148] = b"00000000000\0"
    h[156:157] = kind
    h[257:265] = b"ustar\x0000"
    checksum(h)
    return bytes(h)


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return f"{n}{body}".encode()


def bad_pax_records(rng: random.Random) -> bytes:
    """One pax block's records, some of them malformed (zero, short, long, negative lengths...)."""
    good = [pax_record("path", "x/" + "p" * rng.randint(1, 300) + ".txt"), pax_record("mtime", "1.5")]
    size = rng.choice(INTERESTING_SIZES)
    bad = [
        b"0 ",
        b"0 path=a\n",
        b"1 ",
        b"3 a=\n",
        b"5 a=b",
        b"-5 path=x\n",
        b"99999999999999999999 path=x\n",
        b"12path=x.txt\n",
        b"11 pathx.txt\n",
        b"8 \0\0\0\0\0\0\n",
        b"%d size=%s\n" % (len(f"  size={size}\n") + len(str(len(f"  size={size}\n"))), str(size).encode()),
        b"30 path=short\n",
        b"6 k=v\n" * rng.randint(1, 4000),
    ]
    records = [rng.choice(good + bad) for _ in range(rng.randint(1, 3))]
    return b"".join(records)


class Fuzz:
    def __init__(self, bases: list[bytes], seed: int = 0):
        self.bases, self.seed = bases, seed
        self.headers = [self._header_offsets(b) for b in bases]

    @staticmethod
    def _header_offsets(data: bytes) -> list[int]:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            return [m.offset for m in tar.getmembers()]

    def case(self, index: int) -> tuple[bytes, str]:
        """(archive bytes, what was done to it) of case `index`."""
        rng = random.Random(f"{self.seed}/{index}")
        which = rng.randrange(len(self.bases))
        data, headers, how = bytearray(self.bases[which]), self.headers[which], [f"base{which}"]
        for _ in range(1 if rng.random() < 0.7 else 2):
            op = rng.choice(MUTATIONS)
            data = op(rng, data, headers)
            how.append(op.__name__)
        if rng.random() < 0.12:
            data = bytearray(gzip.compress(bytes(data), mtime=0))
            how.append("gzip")
            if rng.random() < 0.5:
                for _ in range(rng.randint(1, 4)):
                    data[rng.randrange(min(10, len(data) - 1), len(data))] = rng.randrange(256)
                how.append("gzip_bytes")
        return bytes(data), "+".join(how)


def a_header(rng, data, headers) -> int | None:
    """A header's offset that a previous mutation left whole, if any."""
    whole = [at for at in headers if at + BLOCK <= len(data)]
    return rng.choice(whole) if whole else None


def flip_header_bytes(rng, data, headers):
    at = a_header(rng, data, headers)
    if at is None:
        return data
    h = bytearray(data[at : at + BLOCK])
    for _ in range(rng.randint(1, 8)):
        h[rng.randrange(BLOCK)] = rng.randrange(256)
    if rng.random() < 0.8:
        checksum(h)
    return data[:at] + h + data[at + BLOCK :]


def set_size(rng, data, headers):
    at = a_header(rng, data, headers)
    if at is None:
        return data
    h = bytearray(data[at : at + BLOCK])
    value = rng.choice(INTERESTING_SIZES + [len(data) - at, len(data) - at - BLOCK + 1])
    h[124:136] = size_field(value)
    checksum(h)
    return data[:at] + h + data[at + BLOCK :]


def insert_pax(rng, data, headers):
    at = rng.choice(headers)
    body = bad_pax_records(rng)
    size = len(body) if rng.random() < 0.8 else rng.choice(INTERESTING_SIZES)
    block = header_block(b"PaxHeaders/x", size, rng.choice([b"x", b"x", b"g"])) + padded(body)
    return data[:at] + block + data[at:]


def insert_long_name(rng, data, headers):
    at = rng.choice(headers)
    name = b"n" * rng.choice([0, 1, 99, 100, 101, 5000, 70000]) + rng.choice([b"\0", b"", b".txt\0"])
    size = len(name) if rng.random() < 0.7 else rng.choice(INTERESTING_SIZES)
    block = header_block(b"././@LongLink", size, rng.choice([b"L", b"K"])) + padded(name)
    return data[:at] + block + data[at:]


def set_type(rng, data, headers):
    at = a_header(rng, data, headers)
    if at is None:
        return data
    h = bytearray(data[at : at + BLOCK])
    h[156:157] = rng.choice([b"0", b"1", b"2", b"5", b"x", b"g", b"L", b"K", b"S", b"7", b"\0", b"A", b"V"])
    checksum(h)
    return data[:at] + h + data[at + BLOCK :]


def truncate(rng, data, headers):
    cut = rng.choice([rng.randrange(len(data) + 1), rng.choice(headers) + rng.randrange(BLOCK + 1)])
    return data[:cut]


def duplicate_blocks(rng, data, headers):
    blocks = len(data) // BLOCK
    if not blocks:
        return data
    start = rng.randrange(blocks)
    count = rng.randint(1, min(8, blocks - start))
    at = rng.randrange(blocks) * BLOCK
    return data[:at] + data[start * BLOCK : (start + count) * BLOCK] + data[at:]


def delete_blocks(rng, data, headers):
    blocks = len(data) // BLOCK
    if not blocks:
        return data
    start = rng.randrange(blocks)
    count = rng.randint(1, min(8, blocks - start))
    return data[: start * BLOCK] + data[(start + count) * BLOCK :]


def random_bytes(rng, data, headers):
    for _ in range(rng.randint(1, 16) if data else 0):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return data


def zero_header(rng, data, headers):
    at = rng.choice(headers)
    return data[:at] + bytes(BLOCK) + data[at + BLOCK :]


MUTATIONS = [
    flip_header_bytes,
    set_size,
    set_size,
    insert_pax,
    insert_pax,
    insert_long_name,
    set_type,
    truncate,
    duplicate_blocks,
    delete_blocks,
    random_bytes,
    zero_header,
]


# -- the child: reads each case in-process, under its memory limit, and reports it -----------------


def classify(data: bytes, max_member: int) -> tuple[str, str]:
    from contrastive.data.tar import iter_tar_members

    try:
        n = sum(1 for _ in iter_tar_members(io.BufferedReader(io.BytesIO(data)), max_member=max_member))
        return "ok", f"{n} members"
    except tarfile.ReadError as e:
        return "read_error", str(e)[:200]
    except (OSError, EOFError) as e:  # counted by the loader too (a broken shard), if less precisely named
        return "counted", f"{type(e).__name__}: {e}"[:200]
    except MemoryError as e:
        return "memory", repr(e)[:200]
    except Exception as e:  # noqa: BLE001 - what the harness is there to find
        return "uncounted", f"{type(e).__name__}: {e}"[:200]


def child(args: dict) -> None:
    import contrastive.data.tar  # noqa: F401 - imported before the limit is set

    limit_memory(args["memory_mb"])
    fuzz = Fuzz([Path(p).read_bytes() for p in args["bases"]], seed=args["seed"])

    def run_case(index: int) -> tuple[str, str]:
        data = Path(args["files"][index]).read_bytes() if args.get("files") else fuzz.case(index)[0]
        return classify(data, args["max_member"])

    serve_cases(args["indices"], args["seconds"], run_case)


def run_cases(
    bases: list[str],
    *,
    seed: int,
    indices: Iterable[int],
    memory_mb: int = 512,
    seconds: float = 5.0,
    max_member: int = 64 << 20,
    files: list[str] | None = None,
) -> dict[int, tuple[str, str]]:
    """{case index: (status, detail)} for each case, read in child processes (tests/fuzz_harness.py).
    With `files`, case i is the archive files[i] as it is (a corpus) instead of a mutation."""
    args = dict(bases=bases, seed=seed, memory_mb=memory_mb, seconds=seconds, max_member=max_member)
    # the child must work on an undamaged archive, or every case would read as a crash
    probe = run_in_children(Path(__file__), {**args, "indices": [0], "files": bases[:1]}, seconds=seconds)
    if probe[0][0] != "ok":
        raise RuntimeError(f"the fuzz child fails on an undamaged shard: {probe[0]}")
    return run_in_children(Path(__file__), {**args, "indices": list(indices), "files": files}, seconds=seconds)


if __name__ == "__main__":
    child(json.loads(sys.argv[1]))
