"""A seeded, structure-aware mutator of real samples (media and metadata), and the child that decodes
each mutant as the loader does (contrastive.data.decode.BatchDecoder: decode, preprocess, count), under
a wall-clock bound and a memory limit (tests/fuzz_harness.py).

    fuzz = SampleFuzz(seed=0)
    sample, how = fuzz.case(i)                 # case i, the same for every run with that seed
    results = run_cases(seed=0, indices=range(5000), memory_mb=768, seconds=5.0)

A case takes a real sample (a PNG or JPEG image, FLAC, WAV, OGG or MP3 audio, a caption, JSON
metadata) and damages it where damage hurts: an image header's width and height (CRCs made right
again, so the damage reaches the decoder), bit depth and colour type, a chunk's length, JPEG's frame
size; an audio header's rate, channels, sample size and length, the data chunk's size; JSON's
nesting, string and number sizes; a caption's encoding and length; and everywhere truncation, bit
flips, inserted and deleted bytes. Each case ends as one of: `ok` (every modality decoded), `counted`
(what it lost was counted, bad/<modality> or bad/json), `uncounted` (it lost something no counter
holds, or an exception left the decoder), `memory` (a MemoryError under the limit), `timeout` or
`crash` (the harness's).

Run as a script, it is the child: `python sample_fuzz.py CHILD_ARGS_JSON`.
"""

from __future__ import annotations

import io
import json
import random
import resource
import struct
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterable

from fuzz_harness import limit_memory, run_in_children, serve_cases

GOOD = ("ok", "counted")
HUGE = [0, 1, 2**15, 2**16 - 1, 2**24, 2**31 - 1, 2**32 - 1]


def bases() -> list[tuple[str, bytes]]:
    """(extension, bytes) of real media, made here: images, audio in every format, text, metadata."""
    import numpy as np
    import soundfile
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    picture = Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8))
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg")):
        buf = io.BytesIO()
        picture.save(buf, format=fmt)
        out.append((ext, buf.getvalue()))
    wave = (0.2 * np.sin(np.arange(8000) / 7)).astype(np.float32)
    for fmt, ext in (("FLAC", "flac"), ("WAV", "wav"), ("OGG", "ogg"), ("MP3", "mp3")):
        buf = io.BytesIO()
        soundfile.write(buf, wave, 16000, format=fmt)
        out.append((ext, buf.getvalue()))
    out.append(("txt", "a photo of the digit seven, café".encode()))
    out.append(("json", json.dumps({"label": "seven", "group": "g1", "meta": [1, 2.5, None]}).encode()))
    return out


# -- mutations of one medium (each takes and returns a bytearray) -----------------------------------


def png_chunks(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, type) of each PNG chunk."""
    chunks, at = [], 8
    while at + 8 <= len(data):
        length = struct.unpack(">I", data[at : at + 4])[0]
        chunks.append((at, bytes(data[at + 4 : at + 8])))
        at += 12 + length
    return chunks


def png_ihdr(rng, data):
    """Another size, depth, colour type or interlace in IHDR, its CRC made right."""
    at = 8
    body = bytearray(data[at + 8 : at + 21])
    field = rng.choice(["size", "size", "depth", "colour", "interlace"])
    if field == "size":
        body[0:8] = struct.pack(">II", rng.choice(HUGE + [24, 12000]), rng.choice(HUGE + [20, 12000]))
    elif field == "depth":
        body[8] = rng.choice([0, 1, 2, 3, 4, 5, 8, 16, 255])
    elif field == "colour":
        body[9] = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 255])
    else:
        body[12] = rng.choice([0, 1, 2, 255])
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + body))
    return data[: at + 8] + body + crc + data[at + 21 :]


def png_chunk_length(rng, data):
    chunks = png_chunks(data)
    at, _ = rng.choice(chunks)
    data[at : at + 4] = struct.pack(">I", rng.choice(HUGE + [len(data)]))
    return data


def png_text_bomb(rng, data):
    """A compressed text chunk that inflates to megabytes (Pillow caps these)."""
    text = b"Comment\0\0" + zlib.compress(b"x" * rng.choice([1 << 16, 1 << 22, 1 << 26]))
    chunk = struct.pack(">I", len(text)) + b"zTXt" + text + struct.pack(">I", zlib.crc32(b"zTXt" + text))
    return data[:33] + chunk + data[33:]


def jpeg_size(rng, data):
    """Another height and width in the frame header (SOF0/SOF2)."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at >= 0:
            data[at + 5 : at + 9] = struct.pack(">HH", rng.choice([0, 1, 65500, 65535]), rng.choice([0, 1, 65535]))
    return data


def wav_header(rng, data):
    """Another channel count, rate, block size, sample size or data size in a WAV's chunks."""
    fmt = data.find(b"fmt ")
    if fmt < 0:
        return data
    field = rng.choice(["channels", "rate", "align", "bits", "data"])
    if field == "channels":
        data[fmt + 10 : fmt + 12] = struct.pack("<H", rng.choice([0, 2, 64, 65535]))
    elif field == "rate":
        data[fmt + 12 : fmt + 16] = struct.pack("<I", rng.choice([0, 1, 8000, 384000, 2**31 - 1, 2**32 - 1]))
    elif field == "align":
        data[fmt + 20 : fmt + 22] = struct.pack("<H", rng.choice([0, 1, 3, 65535]))
    elif field == "bits":
        data[fmt + 22 : fmt + 24] = struct.pack("<H", rng.choice([0, 1, 7, 64, 65535]))
    else:
        at = data.find(b"data")
        if at >= 0:
            data[at + 4 : at + 8] = struct.pack("<I", rng.choice(HUGE))
    return data


def flac_streaminfo(rng, data):
    """Another rate, channel count, sample size or total length in FLAC's STREAMINFO."""
    info = 8  # after "fLaC" and the block header
    if len(data) < info + 18:
        return data
    bits = int.from_bytes(data[info + 10 : info + 18], "big")  # rate 20, channels 3, bps 5, total 36
    field = rng.choice(["rate", "channels", "bps", "total"])
    if field == "rate":
        bits = (bits & ~(0xFFFFF << 44)) | (rng.choice([0, 1, 655350, 0xFFFFF]) << 44)
    elif field == "channels":
        bits = (bits & ~(0x7 << 41)) | (rng.randrange(8) << 41)
    elif field == "bps":
        bits = (bits & ~(0x1F << 36)) | (rng.randrange(32) << 36)
    else:
        bits = (bits & ~0xFFFFFFFFF) | rng.choice([0, 1, 2**35, 2**36 - 1])
    data[info + 10 : info + 18] = bits.to_bytes(8, "big")
    return data


def json_shape(rng, data):
    """Metadata deep, wide, long, enormous in number, or not UTF-8."""
    kind = rng.choice(["deep", "deep", "long", "number", "encoding", "wide"])
    if kind == "deep":
        depth = rng.choice([100, 10_000, 200_000, 1_000_000])
        return bytearray(b'{"label": ' + b"[" * depth + b"]" * depth + b"}")
    if kind == "long":
        return bytearray(b'{"label": "' + b"y" * rng.choice([1 << 10, 1 << 20, 3 << 20]) + b'"}')
    if kind == "number":
        return bytearray(b'{"label": 1' + b"0" * rng.choice([400, 5000, 100_000]) + b"}")
    if kind == "encoding":
        return bytearray(b'{"label": "\xff\xfe\xc3"}')
    return bytearray(b"{" + b",".join(b'"k%d": %d' % (i, i) for i in range(rng.choice([10, 100_000]))) + b"}")


def text_shape(rng, data):
    kind = rng.choice(["word", "lines", "encoding", "nul", "empty"])
    if kind == "word":
        return bytearray(b"x" * rng.choice([1 << 10, 1 << 16, 1 << 21]))
    if kind == "lines":
        return bytearray(b"\n" * rng.choice([1 << 10, 1 << 20]) + b"a")
    if kind == "encoding":
        return bytearray(b"caf\xe9 \xff\xfe")
    if kind == "nul":
        return bytearray(b"\0" * rng.choice([1, 1000]))
    return bytearray(b" \n\t ")


def truncate(rng, data):
    return data[: rng.randrange(len(data) + 1)]


def flip_bytes(rng, data):
    for _ in range(rng.randint(1, 12) if data else 0):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return data


def insert_bytes(rng, data):
    at = rng.randrange(len(data) + 1)
    return data[:at] + bytearray(rng.randbytes(rng.choice([1, 7, 512]))) + data[at:]


def delete_bytes(rng, data):
    if not data:
        return data
    at = rng.randrange(len(data))
    return data[:at] + data[at + rng.randint(1, 64) :]


ANY = [truncate, flip_bytes, insert_bytes, delete_bytes]
BY_KIND = {
    "png": [png_ihdr, png_ihdr, png_chunk_length, png_text_bomb],
    "jpg": [jpeg_size, jpeg_size],
    "wav": [wav_header, wav_header, wav_header],
    "flac": [flac_streaminfo, flac_streaminfo],
    "ogg": [],
    "mp3": [],
    "json": [json_shape, json_shape],
    "txt": [text_shape, text_shape],
}


class SampleFuzz:
    def __init__(self, seed: int = 0):
        self.seed, self.bases = seed, bases()

    def case(self, index: int) -> tuple[dict, str]:
        """(a sample: __key__ and one damaged member beside an intact caption, what was done)."""
        rng = random.Random(f"{self.seed}/{index}")
        ext, base = rng.choice(self.bases)
        data, how = bytearray(base), [ext]
        for _ in range(1 if rng.random() < 0.75 else 2):
            op = rng.choice(BY_KIND[ext] + ANY)
            data = op(rng, data)
            how.append(op.__name__)
        sample = {"__key__": f"case{index}", "__shard__": "fuzz.tar", ext: bytes(data)}
        if ext != "txt":
            sample["txt"] = b"an intact caption"
        return sample, "+".join(how)


# -- the child ----------------------------------------------------------------------------------------


def verdict(sample: dict, row: dict, counts: Counter, warned: list[str]) -> tuple[str, str]:
    """How the decoder dealt with a sample: every member it holds decoded (`ok`), or what it lost
    counted (`counted`); anything lost without a count, or a MemoryError swallowed, is a failure."""
    if any("MemoryError" in w for w in warned):
        return "memory", warned[0][:200]
    lost = []
    for name, exts in (("image", ("png", "jpg")), ("audio", ("flac", "wav", "ogg", "mp3")), ("text", ("txt",))):
        if any(e in sample for e in exts) and name not in row and not counts[f"bad/{name}"]:
            lost.append(name)
    if lost:
        return "uncounted", f"{lost} left out without a count"
    bad = sorted(k for k in counts if k.startswith("bad/"))
    return ("counted", f"{bad} {warned[:1]}"[:200]) if bad else ("ok", "")


def child(args: dict) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from contrastive.data.decode import BatchDecoder

    from datasets import tiny_modalities

    decoder = BatchDecoder(tiny_modalities(), train=True)
    decoder.succeeded.update(decoder.modalities)  # each modality works: a failure here is the data's
    fuzz = SampleFuzz(seed=args["seed"])
    limit_memory(args["memory_mb"])
    warned: list[str] = []
    decoder.warn = lambda kind, shard, key, reason: warned.append(reason)

    def run_case(index: int) -> tuple[str, str]:
        sample, how = fuzz.case(index)
        counts: Counter = Counter()
        warned.clear()
        try:
            row, _, _ = decoder.decode_sample(sample, counts)
        except MemoryError as e:
            return "memory", f"{how}: {e!r}"[:200]
        except Exception as e:  # noqa: BLE001 - what the harness is there to find: it would end a run
            return "uncounted", f"{how}: {type(e).__name__}: {e}"[:200]
        status, detail = verdict(sample, row, counts, warned)
        return status, f"{how}: {detail}"

    def peak() -> int:  # this child's peak resident memory so far (KiB)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    baseline = peak()  # its imports', before any case

    def run_and_report(index: int) -> tuple[str, str]:
        outcome = run_case(index)
        with open(args["peaks"], "a") as f:  # how far a case took it above its imports' footprint
            f.write(f"{peak() - baseline}\n")
        return outcome

    serve_cases(args["indices"], args["seconds"], run_and_report)


def run_cases(
    *, seed: int, indices: Iterable[int], peaks: str, memory_mb: int = 768, seconds: float = 5.0
) -> dict[int, tuple[str, str]]:
    """{case index: (status, detail)}, decoded in child processes (tests/fuzz_harness.py); after each
    case, how far its child's peak resident memory rose above the child's imports' (KiB) is appended
    to the file `peaks`, one a line."""
    args = dict(seed=seed, memory_mb=memory_mb, seconds=seconds, peaks=peaks)
    return run_in_children(Path(__file__), {**args, "indices": list(indices)}, seconds=seconds)


if __name__ == "__main__":
    child(json.loads(sys.argv[1]))
