"""Samples that are small on disk and huge once decoded, made in milliseconds:

    silent_flac(seconds=3 * 3600)        # 3 hours of silence, ~0.6 MB: 690 MB once decoded whole
    silent_flac(20 * 60, rate=48000, channels=8)   # the search service's upload bomb (1.8 GB decoded)
    looped_flac(600, seed=1)             # 10 minutes of tones repeating every 4096 frames (~3 MB)
    png_claiming(12000, 12000)           # a PNG header of 144 Mpx with one tiny IDAT chunk
    many_channels_wav(64)                # a header claiming 64 channels
    deep_json(200_000)                   # [[[[...]]]]: deeper than Python's parser recursion
    huge_caption(5 << 20)                # one 5 MB word: the BPE tokenizer's worst case

The FLAC is written frame by frame: one block (silence, or tones with a period of one block) encoded
by soundfile, then repeated with each frame's number and checksums (CRC-8 of the header, CRC-16 of the
frame) made right, and the stream's total length in STREAMINFO. A reader sees a valid file of that
length, whose frames decode as any other's.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
import soundfile

BLOCK = 4096


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


@functools.lru_cache(maxsize=None)
def _crc16_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
        table.append(crc)
    return tuple(table)


def _crc16(data: bytes) -> int:
    table, crc = _crc16_table(), 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ byte]
    return crc


def _utf8_number(n: int) -> bytes:
    """FLAC's frame number coding (UTF-8's scheme, extended to 36 bits)."""
    if n < 0x80:
        return bytes([n])
    for length, lead in ((2, 0xC0), (3, 0xE0), (4, 0xF0), (5, 0xF8), (6, 0xFC), (7, 0xFE)):
        if n < 1 << (5 * length + 1 if length < 7 else 36):
            out = [(n >> (6 * i)) & 0x3F | 0x80 for i in range(length - 1)][::-1]
            return bytes([lead | (n >> (6 * (length - 1)))] + out)
    raise ValueError(n)


def _template(rate: int, channels: int, seed: int | None) -> tuple[bytes, bytes]:
    """(the stream up to its first frame, the first frame) of three equal blocks: silence, or tones."""
    block = np.zeros((BLOCK, channels), dtype=np.int16)
    if seed is not None:  # three tones of periods dividing the block, and a little noise: speech-like bit rates
        rng = np.random.default_rng(seed)
        n = np.arange(BLOCK)[:, None]
        tones = sum(np.sin(2 * np.pi * k * n / BLOCK + rng.uniform(0, 6)) for k in rng.integers(40, 400, 3))
        block = (2000 * tones + rng.normal(0, 4, (BLOCK, channels))).astype(np.int16)
    buf = io.BytesIO()
    soundfile.write(buf, np.concatenate([block] * 3), rate, format="FLAC", subtype="PCM_16")
    data = buf.getvalue()
    at = 4
    while True:  # metadata blocks: 1 bit last, 7 bits type, 24 bits length
        last, length = data[at] & 0x80, int.from_bytes(data[at + 1 : at + 4], "big")
        at += 4 + length
        if last:
            break
    head, frames = data[:at], data[at:]
    second = next(i for i in range(2, len(frames) - 1) if frames[i] == 0xFF and frames[i + 1] in (0xF8, 0xF9))
    return head, frames[:second]


def silent_flac(seconds: float, rate: int = 16000, channels: int = 1) -> bytes:
    """A valid FLAC file of `seconds` of silence (whole blocks of 4096 frames), without a seek table."""
    return looped_flac(seconds, rate, channels, seed=None)


@functools.lru_cache(maxsize=8)
def looped_flac(seconds: float, rate: int = 16000, channels: int = 1, *, seed: int | None = 0) -> bytes:
    """A valid FLAC file of `seconds` of one block of tones (seed) or silence (None) repeated."""
    head, first = _template(rate, channels, seed)
    b2, b3 = first[2], first[3]
    lead = first[4]
    number_length = 1 if lead < 0x80 else 8 - (lead ^ 0xFF).bit_length()
    size_code, rate_code = b2 >> 4, b2 & 0x0F
    extra = {6: 1, 7: 2}.get(size_code, 0) + {12: 1, 13: 2, 14: 2}.get(rate_code, 0)
    rest = first[4 + number_length : 4 + number_length + extra]
    body = first[4 + number_length + extra + 1 : -2]  # after the header's CRC-8, before the frame's CRC-16
    count = max(1, int(seconds * rate) // BLOCK)
    frames = []
    for n in range(count):
        header = b"\xff\xf8" + bytes([b2, b3]) + _utf8_number(n) + rest
        frame = header + bytes([_crc8(header)]) + body
        frames.append(frame + struct.pack(">H", _crc16(frame)))
    # STREAMINFO (the first block, after "fLaC" and its 4-byte block header): the total samples are
    # 36 bits from byte 13's low nibble; the MD5 after them left unset (zeros)
    info = bytearray(head[8:42])
    total = count * BLOCK
    info[13] = (info[13] & 0xF0) | (total >> 32)
    info[14:18] = (total & 0xFFFFFFFF).to_bytes(4, "big")
    info[18:34] = bytes(16)
    return head[:8] + bytes(info) + head[42:] + b"".join(frames)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height RGB pixels, with one tiny IDAT chunk (decoding it fails;
    only the size in its header should ever be read)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def many_channels_wav(channels: int, seconds: float = 0.1, rate: int = 16000) -> bytes:
    """A short WAV of `channels` channels (a window of it costs channels x what a mono one does)."""
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros((int(seconds * rate), channels), dtype=np.int16), rate, format="WAV")
    return buf.getvalue()


def deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def huge_caption(size: int) -> bytes:
    return b"a" * size
