"""Audio: soundfile decoding, 16 kHz mono clips, log-mel filterbanks, and a ViT over spectrogram patches.

The features follow ImageBind and AST: Kaldi-style 128-bin log-mel filterbanks (25 ms window, 10 ms
hop, Hann window) from torchaudio, normalised with a fixed mean and standard deviation, fed as a
one-channel image of shape [n_mels, frames] to timm's vision transformer.

Clip length: training takes a random window of `clip_seconds` from a longer clip; evaluation and
`embed` take the first window, or with `eval_windows=3` three evenly spaced windows whose embeddings
are averaged (ImageBind's). A shorter clip is zero-padded, or with `pad=repeat` repeated then padded
(CLAP's repeat-pad), in training and evaluation alike.

Decoding reads no more than that: `decode` reads the file's header only (an `AudioFile`), and the
window (or the evaluation's windows) is read from where it lies, soundfile seeking in WAV, FLAC, OGG
and MP3, so an hour-long recording costs what a 2-second one does. What cannot be sought is read
whole only up to `max_seconds`, and a header that claims more than `max_rate` Hz or `max_channels`
channels is refused before any sample is read; each refusal is a counted bad sample.

The tower can start from other weights (`model.towers.audio.init=...`, see `from_checkpoint`):
- an image ViT, AST's way: `open_clip:ViT-B-16:<tag>` or an open_clip checkpoint file (`visual.*`):
  the patch embedding averaged over RGB, the positional embeddings interpolated (bicubic) from the
  image grid to the spectrogram's, the blocks, `ln_pre` (needs `pre_norm=true`), `ln_post`, and the
  projection (`proj`) as the head where the widths agree;
- an AST checkpoint (keys `module.v.*`, timm's DeiT): `v.` stripped, the distillation token and its
  positional embedding dropped, the 12 x 101 patch grid of AST's AudioSet models (stride 10)
  interpolated to ours, AST's classifier (`mlp_head`) dropped: the head starts fresh;
- a timm ViT state dict of the same layout as ours (a square grid interpolated).
The sizes (width, layers, heads, patch_size) must be the source's.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile
import torch
from torch import nn

from contrastive.errors import ConfigError
from contrastive.modalities.base import Modality, Refused, register_modality


@register_modality("audio")
@dataclass
class Audio(Modality):
    extensions = ("flac", "wav", "mp3", "ogg")
    reads_spans = True  # a long clip's window is read by seeking: the rest of the file is never read
    # The head projects into the shared space: a checkpoint of another model may leave it to start fresh.
    fresh_keys = ("head.weight", "head.bias")

    sample_rate: int = 16_000
    clip_seconds: float = 2.0
    n_mels: int = 128
    frame_shift_ms: float = 10.0
    frame_length_ms: float = 25.0
    # ImageBind's normalisation of the log-mel filterbanks.
    norm_mean: float = -4.268
    norm_std: float = 9.138
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    # Clips shorter than this (after decoding) are rejected as truncated or empty.
    min_seconds: float = 0.05
    pre_norm: bool = False  # a norm before the blocks (CLIP's ln_pre): needed to start from an image ViT
    eval_windows: int = 1  # evaluation and embed: windows averaged over a longer clip (ImageBind: 3)
    pad: str = "zeros"  # a shorter clip: zeros | repeat (CLAP's repeat-pad)
    # training only: this fraction of the spectrogram's patches dropped at random (FLIP, AudioMAE's
    # random masking: timm's PatchDropout); trainer.unmasked_steps turns it off for the last steps
    patch_dropout: float = 0.0
    # a file that cannot be read by window (no seeking) is refused above this length, and every file
    # whose header claims more than these rates or channels (reading a window would cost that much)
    max_seconds: float = 600.0
    max_rate: int = 384_000
    max_channels: int = 32

    def __post_init__(self):
        self._fbank = None  # (window length, shift, FFT size, window, mel banks), built on first use

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))

    @property
    def frames(self) -> int:
        """Time frames of one clip, rounded up to whole patches."""
        hop = self.sample_rate * self.frame_shift_ms / 1000
        win = self.sample_rate * self.frame_length_ms / 1000
        raw = 1 + int((self.clip_samples - win) // hop)
        return math.ceil(raw / self.patch_size) * self.patch_size

    def decode(self, data: bytes, extension: str) -> "AudioFile":
        """The file's header, checked; its samples are read by `views` and `preprocess`, window by window."""
        with soundfile.SoundFile(_opened(data)) as f:
            rate, frames, channels, seekable = f.samplerate, f.frames, f.channels, f.seekable()
        if not 0 < rate <= self.max_rate or not 0 < channels <= self.max_channels:
            raise Refused(
                "header",
                f"audio header claims {rate} Hz and {channels} channels (max_rate {self.max_rate}, "
                f"max_channels {self.max_channels})",
            )
        if frames < self.min_seconds * rate:
            raise ValueError(f"audio of {frames / rate:.3f} s is shorter than min_seconds")
        if not seekable and frames > self.max_seconds * rate:
            raise Refused("too_long", f"audio of {frames / rate:.0f} s cannot be read by window, over max_seconds")
        return AudioFile(data, rate, frames, channels)

    def load(self, item: Any) -> torch.Tensor:
        if isinstance(item, tuple) and len(item) == 2:  # (waveform, sample rate)
            wave, rate = item
            wave = np.asarray(wave, dtype=np.float32)
            return self._to_mono_16k(wave.T if wave.ndim == 2 else wave[:, None], rate)
        if isinstance(item, (torch.Tensor, np.ndarray)):  # a mono waveform at self.sample_rate
            return torch.as_tensor(item, dtype=torch.float32).reshape(-1)
        return super().load(item)

    def _to_mono_16k(self, wave: np.ndarray, rate: int) -> torch.Tensor:
        """[samples, channels] at `rate` -> mono float32 [samples] at self.sample_rate."""
        mono = torch.from_numpy(np.ascontiguousarray(wave.mean(axis=1)))
        if rate != self.sample_rate:
            from torchaudio.functional import resample

            mono = resample(mono, rate, self.sample_rate)
        if mono.numel() < self.min_seconds * self.sample_rate:
            raise ValueError(f"audio of {mono.numel() / self.sample_rate:.3f} s is shorter than min_seconds")
        if not torch.isfinite(mono).all():
            raise ValueError("audio holds non-finite samples")
        return mono

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """Kaldi's log-mel filterbank as torchaudio.compliance.kaldi.fbank computes it (Hann window,
        DC removal, pre-emphasis 0.97, power spectrum, HTK-compatible mel banks, no dither), with the
        window and mel banks built once instead of on every call (3x faster per clip). [frames, n_mels]"""
        if self._fbank is None:
            from torchaudio.compliance.kaldi import get_mel_banks

            win = int(self.sample_rate * self.frame_length_ms / 1000)
            shift = int(self.sample_rate * self.frame_shift_ms / 1000)
            padded = 1 << (win - 1).bit_length()
            banks, _ = get_mel_banks(self.n_mels, padded, float(self.sample_rate), 20.0, 0.0, 100.0, -500.0, 1.0)
            banks = torch.nn.functional.pad(banks, (0, 1))  # Kaldi drops the Nyquist bin
            self._fbank = (win, shift, padded, torch.hann_window(win, periodic=False), banks.T.contiguous())
        win, shift, padded, window, banks = self._fbank
        frames = wave.unfold(0, win, shift)  # [frames, win], Kaldi's snip_edges framing
        frames = frames - frames.mean(dim=1, keepdim=True)
        frames = frames - 0.97 * torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
        spectrum = torch.fft.rfft(frames * window, n=padded).abs().pow(2.0)
        return torch.clamp_min(spectrum @ banks, torch.finfo(torch.float32).eps).log()

    def window(self, clip: "AudioFile", start: float) -> torch.Tensor:
        """The clip_seconds window from `start` (a fraction of the room before the clip's end: 0 the
        first window, 1 the last) of a file, read from there, as mono float32 at self.sample_rate."""
        count = min(clip.frames, math.ceil(self.clip_seconds * clip.rate) + (clip.rate != self.sample_rate))
        first = int(round(start * (clip.frames - count)))
        return self._to_mono_16k(clip.read(first, count), clip.rate)

    def samples(self, value: "torch.Tensor | AudioFile") -> torch.Tensor:
        """The whole clip as mono float32 at self.sample_rate (a file up to max_seconds long)."""
        if not isinstance(value, AudioFile):
            return value
        if value.frames > self.max_seconds * value.rate:
            raise Refused("too_long", f"audio of {value.frames / value.rate:.0f} s is over max_seconds to read whole")
        return self._to_mono_16k(value.read(0, value.frames), value.rate)

    def views(self, value: "torch.Tensor | AudioFile") -> list["torch.Tensor | AudioFile"]:
        """With eval_windows=K and a clip longer than clip_seconds: K evenly spaced windows (the first
        at the start, the last at the end), whose embeddings are averaged; else the clip itself. Of a
        file, only those windows are read."""
        n = self.clip_samples
        if isinstance(value, AudioFile):
            if self.eval_windows <= 1 or value.frames <= self.clip_seconds * value.rate:
                return [value]
            return [self.window(value, i / (self.eval_windows - 1)) for i in range(self.eval_windows)]
        if self.eval_windows <= 1 or value.numel() <= n:
            return [value]
        starts = torch.linspace(0, value.numel() - n, self.eval_windows).round().long().tolist()
        return [value[s : s + n] for s in starts]

    def preprocess(self, value: "torch.Tensor | AudioFile", *, train: bool) -> torch.Tensor:
        n = self.clip_samples
        if isinstance(value, AudioFile):  # read only the window: a random one in training, else the first
            room = value.frames - math.ceil(self.clip_seconds * value.rate)
            at = int(torch.randint(0, room + 1, ()).item()) / room if train and room > 0 else 0.0
            value = self.window(value, at)
        if value.numel() > n:  # a random window in training, the first window otherwise
            start = int(torch.randint(0, value.numel() - n + 1, ()).item()) if train else 0
            value = value[start : start + n]
        elif value.numel() < n:
            if self.pad == "repeat":  # whole copies, then zeros (CLAP's repeat-pad)
                value = value.repeat(n // value.numel())
            value = torch.nn.functional.pad(value, (0, n - value.numel()))
        mel = (self.log_mel(value) - self.norm_mean) / (2 * self.norm_std)
        mel = torch.nn.functional.pad(mel, (0, 0, 0, self.frames - mel.shape[0]))
        return mel.T[None].contiguous()  # [1, n_mels, frames]

    def empty(self) -> torch.Tensor:
        return torch.zeros(1, self.n_mels, self.frames)

    def build_encoder(self, embed_dim: int) -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(
            img_size=(self.n_mels, self.frames),
            patch_size=self.patch_size,
            in_chans=1,
            num_classes=embed_dim,  # the head is the projection into the shared space
            embed_dim=self.width,
            depth=self.layers,
            num_heads=self.heads,
            mlp_ratio=self.mlp_ratio,
            global_pool="token",
            pre_norm=self.pre_norm,
            patch_drop_rate=self.patch_dropout,
        )

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along mel bins and time."""
        return self.n_mels // self.patch_size, self.frames // self.patch_size

    def from_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The tower's weights from an image ViT (open_clip's layout) or an AST checkpoint (see the module
        docstring); None for anything else (our own layout is taken as it is)."""
        from timm.layers import resample_abs_pos_embed

        if any(k.startswith(("module.v.", "v.")) for k in state):  # AST: timm's DeiT under `v.`
            v = {
                k.removeprefix("module.").removeprefix("v."): t
                for k, t in state.items()
                if k.removeprefix("module.").startswith("v.")
            }
            prefix = 1 + ("dist_token" in v)
            tokens = v["pos_embed"].shape[1] - prefix
            old = (12, 101) if tokens == 12 * 101 else _square(tokens, "an AST checkpoint's positional embeddings")
            v.pop("dist_token", None)
            v["pos_embed"] = resample_abs_pos_embed(
                torch.cat([v["pos_embed"][:, :1], v["pos_embed"][:, prefix:]], 1),
                list(self.grid),
                list(old),
                num_prefix_tokens=1,
            )
            return {k: t for k, t in v.items() if not k.startswith("head")}
        visual = {k[len("visual.") :]: t for k, t in state.items() if k.startswith("visual.")} or state
        if "conv1.weight" not in visual or "transformer.resblocks.0.attn.in_proj_weight" not in visual:
            return None
        if "ln_pre.weight" in visual and not self.pre_norm:
            raise ConfigError("model.towers.audio.init: an image ViT's ln_pre needs modality.audio.pre_norm=true")
        out = {
            "patch_embed.proj.weight": visual["conv1.weight"].mean(dim=1, keepdim=True),  # RGB averaged
            "cls_token": visual["class_embedding"].reshape(1, 1, -1),
            "pos_embed": resample_abs_pos_embed(
                visual["positional_embedding"][None],
                list(self.grid),
                list(_square(visual["positional_embedding"].shape[0] - 1, "the image ViT's grid")),
                num_prefix_tokens=1,
            ),
        }
        names = {
            "ln_pre": "norm_pre",
            "ln_post": "norm",
            "ln_1": "norm1",
            "ln_2": "norm2",
            "attn.in_proj_": "attn.qkv.",
            "attn.out_proj": "attn.proj",
            "mlp.c_fc": "mlp.fc1",
            "mlp.c_proj": "mlp.fc2",
        }
        for key, tensor in visual.items():
            if key.startswith(("ln_pre.", "ln_post.", "transformer.resblocks.")):
                new = key.replace("transformer.resblocks.", "blocks.")
                for old_name, new_name in names.items():
                    new = new.replace(old_name, new_name)
                out[new] = tensor
        if "proj" in visual and visual["proj"] is not None:  # [width, embed_dim]: the head, transposed
            out["head.weight"] = visual["proj"].T.contiguous()
            out["head.bias"] = torch.zeros(visual["proj"].shape[1])
        return out


@dataclass(frozen=True)
class AudioFile:
    """An audio file whose header has been read and checked, its samples not yet: `read` decodes the
    frames a window needs, seeking to them."""

    data: Any  # bytes, or the member unread (contrastive.data.tar.Span: `open()` reads it as a file)
    rate: int
    frames: int
    channels: int

    def read(self, start: int, count: int) -> np.ndarray:
        """[frames, channels] float32 from frame `start`: `count` of them, or what the file holds (a
        truncated file may hold fewer than its header says; none at all is an error)."""
        with soundfile.SoundFile(_opened(self.data)) as f:
            if start:
                f.seek(start)
            wave = f.read(count, dtype="float32", always_2d=True)
        if not len(wave):
            raise ValueError(f"audio: no samples at {start / self.rate:.2f} s (a truncated file)")
        return wave


def _opened(data: Any) -> io.RawIOBase | io.BytesIO:
    """A file of a member's bytes, or of a member unread (a Span: see Modality.reads_spans)."""
    return io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data.open()


def _square(tokens: int, what: str) -> tuple[int, int]:
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ConfigError(f"model.towers.audio.init: {what} has {tokens} patches, no square grid")
    return side, side
