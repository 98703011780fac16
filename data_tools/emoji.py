"""A harder data set than the demo: emoji with their human-written names, spoken and captioned.

    contrastive-data emoji data/emoji

Concepts are the single-character emoji of Noto Color Emoji (Debian `fonts-noto-color-emoji`) named
in CLDR's English annotations (Debian `unicode-cldr-core`): about 1,350 of them, each with a name
("face with tears of joy") and keywords ("joy | laugh | tear"). A sample pairs one rendering of an
emoji (its own background colour, size, position and tilt), its name spoken by espeak-ng and a
caption from its name and keywords, with `{"label": "<name>"}` as metadata.

Two evaluation splits, both spoken by voices and captioned by templates never used in training:
- `heldout`: concepts never seen in training (a fifth of them by default), two views each: zero-shot
  over a few hundred unseen names, far from its ceiling (a short run on 2 CPU cores stays near 3%);
- `seen`: one new view of every training concept: a thousand-way zero-shot and retrieval that a
  short run learns, so recipes that train better show it within a few minutes.
"""

from __future__ import annotations

import logging
import random
import shutil
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from contrastive.data_tools.demo import encode_pil, paired_sample, random_voice, speak, speakers, write_split

log = logging.getLogger(__name__)

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
ANNOTATIONS = Path("/usr/share/unicode/cldr/common/annotations/en.xml")
FONT_SIZE = 109  # the size of the font's colour bitmaps; Pillow renders colour emoji at no other
# Skin-tone modifiers, regional-indicator letters and hair components: parts of sequences, not concepts.
NOT_CONCEPTS = [(0x1F3FB, 0x1F3FF), (0x1F1E6, 0x1F1FF), (0x1F9B0, 0x1F9B3)]
TRAIN_CAPTIONS = [
    "{name}",
    "an emoji of {name}",
    "{name} emoji",
    "{keywords}",
    "{name}: {keywords}",
    "a picture of {name}",
    "the {name} icon",
    "{keywords}, {name}",
]
HELDOUT_CAPTIONS = ["{name}", "an icon showing {name}", "{name}, as an emoji"]


@dataclass(frozen=True)
class Emoji:
    char: str
    name: str
    keywords: tuple[str, ...]


def concepts(font: Path = FONT, annotations: Path = ANNOTATIONS) -> list[Emoji]:
    """Every single-character emoji that the font draws and CLDR names, in code point order."""
    for path, package in ((font, "fonts-noto-color-emoji"), (annotations, "unicode-cldr-core")):
        if not path.exists():
            raise RuntimeError(f"{path} is missing (apt-get install {package}; scripts/install.sh does it)")
    from fontTools.ttLib import TTFont

    drawn = set(TTFont(font).getBestCmap())
    names: dict[str, str] = {}
    keywords: dict[str, list[str]] = {}
    for node in ET.parse(annotations).getroot().iter("annotation"):
        cp, text = node.get("cp", ""), (node.text or "").strip()
        if node.get("type") == "tts":
            names[cp] = text
        else:
            keywords[cp] = [k.strip() for k in text.split("|") if k.strip()]
    found = []
    for cp, name in names.items():
        char = cp.replace("\ufe0f", "")
        if len(char) != 1 or ord(char) not in drawn or any(lo <= ord(char) <= hi for lo, hi in NOT_CONCEPTS):
            continue
        if ord(char) < 0x2000:  # the font's digits, '#' and '*' are keycap parts, drawn as plain glyphs
            continue
        found.append(Emoji(char, name, tuple(k for k in keywords.get(cp, []) if k != name)))
    return sorted(found, key=lambda e: ord(e.char))


class Renderer:
    """Draws an emoji once at the font's bitmap size, then each view on its own background."""

    def __init__(self, size: int, font: Path = FONT):
        self.size = size
        self.font = ImageFont.truetype(str(font), FONT_SIZE)
        self.glyphs: dict[str, Image.Image] = {}

    def glyph(self, char: str) -> Image.Image:
        if char not in self.glyphs:
            left, top, right, bottom = self.font.getbbox(char)
            canvas = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
            ImageDraw.Draw(canvas).text((-left, -top), char, font=self.font, embedded_color=True)
            self.glyphs[char] = canvas.crop(canvas.getbbox() or (0, 0, 1, 1))
        return self.glyphs[char]

    def view(self, char: str, rng: random.Random) -> Image.Image:
        """The emoji at 55-95% of the frame, tilted up to 20 degrees, somewhere on a random two-tone
        background."""
        big = 2 * self.size  # drawn at twice the size, then downsampled: smooth edges
        top, bottom = [tuple(rng.randint(0, 255) for _ in range(3)) for _ in range(2)]
        ramp = Image.linear_gradient("L").resize((big, big))
        frame = Image.composite(Image.new("RGB", (big, big), bottom), Image.new("RGB", (big, big), top), ramp)
        glyph = self.glyph(char).rotate(rng.uniform(-20, 20), resample=Image.BICUBIC, expand=True)
        scale = rng.uniform(0.55, 0.95) * big / max(glyph.size)
        glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.LANCZOS)
        x, y = rng.randint(0, big - glyph.width), rng.randint(0, big - glyph.height)
        frame.paste(glyph, (x, y), glyph)
        return frame.resize((self.size, self.size), Image.LANCZOS)


def caption(emoji: Emoji, templates: list[str], rng: random.Random) -> str:
    words = list(emoji.keywords) or [emoji.name]
    picked = rng.sample(words, k=min(len(words), rng.randint(1, 3)))
    return rng.choice(templates).format(name=emoji.name, keywords=", ".join(picked))


def build_emoji(
    out_dir: str | Path,
    *,
    seed: int = 0,
    copies: int = 4,
    heldout_copies: int = 2,
    heldout_fraction: float = 0.2,
    size: int = 64,
    max_concepts: int = 0,
    shard_size: int = 500,
) -> dict[str, int]:
    """Writes `out_dir/train`, `out_dir/heldout` (other concepts) and `out_dir/seen` (new views of the
    training concepts), and `out_dir/concepts.tsv` (split, character, name); returns the splits'
    sample counts. `max_concepts` takes that many
    concepts spread over the whole list, for quick test sets."""
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    found = concepts()
    if max_concepts:
        found = found[:: max(1, len(found) // max_concepts)][:max_concepts]
    order = list(found)
    rng.shuffle(order)
    cut = max(1, round(heldout_fraction * len(order)))
    held, train = order[:cut], order[cut:]
    train_voices, held_voices = speakers()
    renderer = Renderer(size)
    for split in ("train", "heldout", "seen"):
        shutil.rmtree(out_dir / split, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [("train", e) for e in train] + [("heldout", e) for e in held]
    (out_dir / "concepts.tsv").write_text("".join(f"{s}\t{e.char}\t{e.name}\n" for s, e in rows))
    splits = {
        "train": (train, copies, train_voices, TRAIN_CAPTIONS, 0.03),
        "heldout": (held, heldout_copies, held_voices, HELDOUT_CAPTIONS, 0.0),
        "seen": (train, 1, held_voices, HELDOUT_CAPTIONS, 0.0),
    }
    counts = {}
    for name, (emojis, n, voices, templates, drop) in splits.items():
        plan = [(f"{name}-{c}-{i:04d}", e, random_voice(voices, rng)) for c in range(n) for i, e in enumerate(emojis)]
        log.info("emoji %s: %d samples of %d concepts", name, len(plan), len(emojis))
        with ThreadPoolExecutor(max_workers=8) as pool:
            clips = list(pool.map(lambda row: speak(row[1].name, row[2]), plan))
        samples = [
            paired_sample(
                key,
                e.name,
                voice,
                caption(e, templates, rng),
                partial(encode_pil, renderer.view(e.char, rng)),
                clip,
                drop,
                rng,
            )
            for (key, e, voice), clip in zip(plan, clips)
        ]
        counts[name] = write_split(samples, out_dir / name, name, shard_size, rng)
    return counts
