"""Each built-in modality: decoding of every shard format, rejection of bad bytes, preprocessing,
and its tower's output (shape, unit norm after the model)."""

import io
from collections import Counter

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image as PILImage

from contrastive.modalities import build_modality
from contrastive.model import ContrastiveModel

TINY = {
    "image": dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
    "audio": dict(clip_seconds=1.0, n_mels=64, patch_size=16, width=64, layers=2, heads=2),
    "text": dict(context_length=16, width=64, layers=2, heads=2),
}


def image_bytes(fmt: str, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(0)
    img = PILImage.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def audio_bytes(fmt: str, seconds=0.5, rate=22050, channels=2) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wave = np.stack([0.3 * np.sin(2 * np.pi * 440 * t)] * channels, axis=1).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_image_decodes_every_format(fmt, ext):
    image = build_modality("image", **TINY["image"])
    decoded = image.decode(image_bytes(fmt), ext)
    assert decoded.size == (40, 30) and decoded.mode == "RGB"
    x = image.preprocess(decoded, train=False)  # pixels: normalised where the tower runs
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(image.on_device(x[None])[0], image.transform(False)(decoded))  # open_clip's, exactly


@pytest.mark.parametrize("size", [(40, 30), (32, 32), (20, 90)])
def test_image_training_preprocess_is_open_clips_transform(size, monkeypatch):
    """Ours computes open_clip's training transform itself: the same pixels for the same crop, and
    crops drawn from the same distribution as torchvision's RandomResizedCrop."""
    from torchvision.transforms import functional as TF

    image = build_modality("image", **TINY["image"])
    img = image.decode(image_bytes("PNG", size), "png")
    reference = image.transform(True)
    crop, _, to_tensor, normalize = reference.transforms
    assert type(crop).__name__ == "RandomResizedCrop" and tuple(crop.scale) == tuple(image.train_crop_scale)
    n = 4000
    torch.manual_seed(0)
    ours = [image.crop_box(*img.size) for _ in range(n)]
    theirs = [crop.get_params(img, crop.scale, crop.ratio) for _ in range(n)]
    for field in range(4):  # top, left, height, width: each marginal within sampling noise of theirs
        a, b = Counter(box[field] for box in ours), Counter(box[field] for box in theirs)
        distance = sum(abs(a[v] - b[v]) for v in set(a) | set(b)) / (2 * n)
        assert distance < 0.05, (field, a, b)
    for box in ours[:20]:
        monkeypatch.setattr(image, "crop_box", lambda w, h, box=box: box)
        expected = normalize(to_tensor(TF.resized_crop(img, *box, crop.size, crop.interpolation, antialias=True)))
        assert torch.equal(image.on_device(image.preprocess(img, train=True)[None])[0], expected)


def test_image_rejects_corrupt_bytes():
    image = build_modality("image", **TINY["image"])
    data = image_bytes("PNG")
    with pytest.raises(OSError, match="truncated"):
        image.decode(data[: len(data) // 2], "png")
    with pytest.raises(ValueError, match="not an image Pillow can read"):  # said of the input, not a BytesIO
        image.decode(b"not an image at all", "jpg")


@pytest.mark.parametrize("fmt,ext", [("FLAC", "flac"), ("WAV", "wav"), ("OGG", "ogg"), ("MP3", "mp3")])
def test_audio_decodes_every_format_to_16k_mono(fmt, ext):
    audio = build_modality("audio", **TINY["audio"])
    clip = audio.decode(audio_bytes(fmt), ext)  # the header: samples are read by window
    wave = audio.samples(clip)
    assert wave.ndim == 1 and wave.dtype == torch.float32
    assert abs(wave.numel() - 8000) < 1200  # 0.5 s at 16 kHz (lossy codecs pad a little)
    x = audio.preprocess(clip, train=True)
    assert x.shape == (1, 64, audio.frames) and torch.isfinite(x).all()
    assert audio.frames % audio.patch_size == 0


def test_audio_rejects_truncated_and_empty():
    audio = build_modality("audio", **TINY["audio"])
    data = audio_bytes("FLAC")
    with pytest.raises((soundfile.LibsndfileError, ValueError)):  # a header, no samples: refused when read
        audio.preprocess(audio.decode(data[:100], "flac"), train=False)
    with pytest.raises(soundfile.LibsndfileError):
        audio.decode(b"RIFF\x00\x00", "wav")
    with pytest.raises(ValueError, match="shorter"):
        audio.decode(audio_bytes("WAV", seconds=0.01), "wav")


def test_audio_crop_is_random_in_training_only():
    audio = build_modality("audio", **TINY["audio"])
    wave = torch.randn(16000 * 3)
    assert torch.equal(audio.preprocess(wave, train=False), audio.preprocess(wave, train=False))
    torch.manual_seed(0)
    a = audio.preprocess(wave, train=True)
    b = audio.preprocess(wave, train=True)
    assert not torch.equal(a, b)


def test_text_decodes_and_tokenizes():
    text = build_modality("text", **TINY["text"])
    assert text.decode("  the digit seven \n".encode(), "txt") == "the digit seven"
    tokens = text.preprocess("the digit seven", train=False)
    assert tokens.shape == (16,) and tokens.dtype == torch.long
    assert tokens[0] == text.tokenizer.sot_token_id and text.tokenizer.eot_token_id in tokens.tolist()
    with pytest.raises(ValueError, match="empty"):
        text.decode(b"   ", "txt")
    with pytest.raises(UnicodeDecodeError):
        text.decode(b"\xff\xfe\xfa", "txt")


def test_model_embeds_every_modality_to_unit_vectors():
    torch.manual_seed(0)
    modalities = {name: build_modality(name, **kw) for name, kw in TINY.items()}
    model = ContrastiveModel(modalities, embed_dim=24)
    batch = {name: torch.stack([m.empty()] * 3) for name, m in modalities.items()}
    batch["image"] = torch.randn(3, 3, 32, 32)
    out = model(batch)
    for name in TINY:
        assert out[name].shape == (3, 24)
        assert torch.allclose(out[name].norm(dim=-1), torch.ones(3), atol=1e-5)
    # Raw inputs through the same preprocessing: a caption, a PIL image, a (waveform, rate) pair.
    assert model.embed("text", ["a caption"]).shape == (1, 24)
    pil = PILImage.open(io.BytesIO(image_bytes("PNG")))
    assert model.embed("image", [pil]).shape == (1, 24)
    assert model.embed("audio", [(np.zeros(22050, dtype=np.float32) + 0.1, 22050)]).shape == (1, 24)


def test_log_mel_equals_torchaudio_kaldi_fbank():
    from torchaudio.compliance.kaldi import fbank

    audio = build_modality("audio", n_mels=128, clip_seconds=1.0)
    wave = torch.randn(16000, generator=torch.Generator().manual_seed(0)) * 0.1
    ours = audio.log_mel(wave)
    ref = fbank(
        wave[None],
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10.0,
        frame_length=25.0,
    )
    assert ours.shape == ref.shape == (98, 128)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-5)
