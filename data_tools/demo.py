"""The built-in demo data set: ten spoken, written and captioned digits, made offline.

    contrastive-data demo data/demo

Concepts are the digits zero..nine. A sample pairs a handwritten digit (scikit-learn's bundled
`load_digits`, upscaled to 32x32), the digit's word spoken by espeak-ng (16 kHz FLAC or WAV) and a
caption from templates, with `{"label": "<word>"}` as metadata. The held-out split uses other
digit images, other voices (espeak-ng variants never heard in training) and other caption
templates, so that evaluation on it measures generalisation. A few training samples lack a
modality on purpose, as real data does.
"""

from __future__ import annotations

import io
import logging
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

from contrastive.data.shards import ShardWriter

log = logging.getLogger(__name__)

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TRAIN_CAPTIONS = [
    "a handwritten {w}",
    "the digit {w}",
    "the number {w} written by hand",
    "someone says {w}",
    "{w}",
    "a drawing of the number {w}",
    "the spoken word {w}",
    "a scribbled {w}",
]
HELDOUT_CAPTIONS = ["a photo of the number {w}", "the word {w}", "this is a {w}"]
# espeak-ng accents of English, and voice variants; the held-out ones never occur in training.
TRAIN_LANGS = ["en-us", "en", "en-gb-scotland", "en-029", "en-gb-x-gbclan"]
HELDOUT_LANGS = ["en-gb-x-rp", "en-us-nyc", "en-gb-x-gbcwmd"]
TRAIN_VARIANTS = ["m1", "m2", "m3", "m4", "f1", "f2", "f3", "klatt", "croak", "Andy", "Annie", "john"]
HELDOUT_VARIANTS = ["m5", "m6", "f4", "f5", "klatt2", "Michael", "Mike", "anika"]
SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class Voice:
    lang: str
    variant: str
    speed: int
    pitch: int

    @property
    def name(self) -> str:
        return f"{self.lang}+{self.variant}/s{self.speed}/p{self.pitch}"


def available_variants() -> set[str]:
    out = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True).stdout
    names = set()
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 5:
            names.add(fields[-1].split("/", 1)[-1])  # the file column, e.g. "!v/m3" -> "m3"
    return names


def speakers() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The (accent, variant) speakers of the training and of the held-out split: never the same."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng; scripts/install.sh does it)")
    variants = available_variants()
    train = [(lang, v) for lang in TRAIN_LANGS for v in TRAIN_VARIANTS if v in variants]
    held = [(lang, v) for lang in HELDOUT_LANGS for v in HELDOUT_VARIANTS if v in variants]
    if not train or not held:
        raise RuntimeError(f"espeak-ng offers too few voice variants: {sorted(variants)}")
    return train, held


def random_voice(speakers: list[tuple[str, str]], rng: random.Random) -> Voice:
    """A speaker (accent, variant) at a random speed and pitch: every clip of the set is unique."""
    lang, variant = rng.choice(speakers)
    return Voice(lang, variant, rng.randint(120, 200), rng.randint(25, 75))


def speak(word: str, voice: Voice) -> np.ndarray:
    """The word spoken by espeak-ng, as mono float32 at 16 kHz."""
    wav = subprocess.run(
        [
            "espeak-ng",
            "-v",
            f"{voice.lang}+{voice.variant}",
            "-s",
            str(voice.speed),
            "-p",
            str(voice.pitch),
            "--stdout",
            word,
        ],
        capture_output=True,
        check=True,
    ).stdout
    data, rate = soundfile.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    data = data.mean(axis=1)
    if rate != SAMPLE_RATE:  # linear resampling is enough for synthetic speech
        t = np.arange(int(len(data) * SAMPLE_RATE / rate)) * rate / SAMPLE_RATE
        data = np.interp(t, np.arange(len(data)), data).astype(np.float32)
    peak = float(np.abs(data).max()) or 1.0
    return data / peak * 0.9


def encode_audio(wave: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wave, SAMPLE_RATE, format=fmt.upper())
    return buf.getvalue()


def encode_image(pixels: np.ndarray, fmt: str) -> bytes:
    """An 8x8 digit (values 0..16, ink high) -> a 32x32 dark-on-light RGB image."""
    gray = (255 - pixels * (255 / 16)).clip(0, 255).astype(np.uint8)
    return encode_pil(Image.fromarray(gray, mode="L").resize((32, 32), Image.BILINEAR).convert("RGB"), fmt)


def encode_pil(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format={"png": "PNG", "jpg": "JPEG"}[fmt], **({"quality": 95} if fmt == "jpg" else {}))
    return buf.getvalue()


def build_split(name, images, targets, speakers, templates, copies, drop, rng, out_dir, shard_size):
    """Writes one split: each image appears `copies` times, each time with its own clip and caption."""
    rows = [
        (f"{name}-{copy}-{i:05d}", pixels, WORDS[digit], random_voice(speakers, rng))
        for copy in range(copies)
        for i, (pixels, digit) in enumerate(zip(images, targets))
    ]
    log.info("demo %s: %d samples from %d images, %d speakers", name, len(rows), len(images), len(speakers))
    with ThreadPoolExecutor(max_workers=8) as pool:
        clips = list(pool.map(lambda row: speak(row[2], row[3]), rows))
    samples = [
        paired_sample(
            key, word, voice, rng.choice(templates).format(w=word), partial(encode_image, pixels), clip, drop, rng
        )
        for (key, pixels, word, voice), clip in zip(rows, clips)
    ]
    return write_split(samples, out_dir / name, name, shard_size, rng)


def paired_sample(key, label, voice, caption, image, clip, drop, rng) -> dict:
    """One sample: an image (`image(fmt)` encodes it, PNG or JPEG), the spoken clip (FLAC or WAV), the
    caption and `{"label", "voice"}`; with probability 3 x `drop` one modality is left out, as real
    data lacks modalities now and then."""
    sample = {"__key__": key, "json": {"label": label, "voice": voice.name}, "txt": caption}
    img_fmt = "jpg" if rng.random() < 0.3 else "png"
    sample[img_fmt] = image(img_fmt)
    audio_fmt = "wav" if rng.random() < 0.2 else "flac"
    sample[audio_fmt] = encode_audio(clip, audio_fmt)
    r = rng.random()
    if r < drop:
        del sample["txt"]
    elif r < 2 * drop:
        del sample[audio_fmt]
    elif r < 3 * drop:
        del sample[img_fmt]
    return sample


def write_split(samples: list[dict], out_dir: Path, prefix: str, shard_size: int, rng: random.Random) -> int:
    """Shuffles the samples into shards of `shard_size` under `out_dir`; returns their count."""
    rng.shuffle(samples)
    with ShardWriter(out_dir, prefix=prefix, max_count=shard_size) as writer:
        writer.write_all(samples)
    return len(samples)


def build_demo(
    out_dir: str | Path, *, seed: int = 0, copies: int = 2, shard_size: int = 400, max_images: int = 0
) -> dict[str, int]:
    """Writes `out_dir/train` and `out_dir/heldout`, and beside them `entries.txt` (the digits' names,
    one a line) and `seven.png` (a held-out image); returns the splits' sample counts. `max_images`
    caps the training images (the held-out split gets a quarter as many) for quick test sets."""
    from sklearn.datasets import load_digits

    out_dir = Path(out_dir)
    rng = random.Random(seed)
    digits = load_digits()
    order = list(range(len(digits.images)))
    rng.shuffle(order)
    cut = int(0.8 * len(order))
    train_idx, held_idx = order[:cut], order[cut:]
    if max_images:
        train_idx, held_idx = train_idx[:max_images], held_idx[: max(max_images // 4, 10)]
    train_voices, held_voices = speakers()
    for split in ("train", "heldout"):
        shutil.rmtree(out_dir / split, ignore_errors=True)
    counts = {
        "train": build_split(
            "train",
            digits.images[train_idx],
            digits.target[train_idx],
            train_voices,
            TRAIN_CAPTIONS,
            copies,
            0.03,
            rng,
            out_dir,
            shard_size,
        ),
        "heldout": build_split(
            "heldout",
            digits.images[held_idx],
            digits.target[held_idx],
            held_voices,
            HELDOUT_CAPTIONS,
            1,
            0.0,
            rng,
            out_dir,
            shard_size,
        ),
    }
    # what the README's examples read besides the shards: the concept entries `balance` caps (the
    # digits' names), and a held-out picture to search with
    (out_dir / "entries.txt").write_text("\n".join(WORDS) + "\n")
    seven = next((i for i in held_idx if digits.target[i] == 7), held_idx[0])
    (out_dir / "seven.png").write_bytes(encode_image(digits.images[seven], "png"))
    return counts
