"""The decode budget: samples small on disk and huge once decoded go through a real training run,
which finishes, counts each refusal by kind (and names the sample in its log), and stays within 1.5x
the peak memory of the same run without them. Hours of audio are read by window and a megabyte
caption is cut before its tokenizer: trained on, not refused."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import BIN, REPO, read_jsonl, tiny_overrides
from datasets import sample, write_dataset
from pathological import deep_json, huge_caption, many_channels_wav, png_claiming, silent_flac

# key -> (what is done to the sample, the counters it must raise)
PATHOLOGICAL = {
    "deep_json": (lambda s: s.update(json=deep_json(200_000)), ["bad/json", "refused/json/too_deep"]),
    "huge_json": (lambda s: s.update(json=b'{"pad": "' + b"y" * (2 << 20) + b'"}'), ["refused/json/too_large"]),
    "giant_png": (lambda s: s.update(png=png_claiming(12000, 12000)), ["bad/image", "refused/image/too_many_pixels"]),
    "many_channels": (lambda s: s.update(flac=many_channels_wav(64)), ["refused/audio/header"]),
    "three_hours": (lambda s: s.update(flac=silent_flac(3 * 3600)), []),  # read by window: a good sample
    "upload_bomb": (lambda s: s.update(flac=silent_flac(20 * 60, rate=48000, channels=8)), []),  # 1.8 GB whole
    "huge_caption": (lambda s: s.update(txt=huge_caption(5 << 20)), []),  # cut before the tokenizer
    # the bad-input tests' own kinds
    "corrupt_png": (lambda s: s.update(png=b"\x89PNG\r\n\x1a\nbroken"), ["bad/image"]),
    "truncated_flac": (lambda s: s.update(flac=s["flac"][:200]), ["bad/audio"]),
    "not_utf8": (lambda s: s.update(txt=b"\xff\xfe caf\xe9"), ["bad/text"]),
}

PEAK = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print('peak_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def train(data, run_dir) -> tuple[subprocess.CompletedProcess, int]:
    """contrastive-train over `data` in a wrapper process: (the run, the peak resident KiB of it and its
    loader workers)."""
    args = tiny_overrides(
        data,
        run_dir,
        f"data.train={data}",
        "data.eval=null",
        "export=false",
        "data.batch_size=8",
        "data.num_workers=1",
        "data.max_bad_fraction=0.6",
        "data.bad_check_after=1",
        "trainer.max_steps=10",
    )
    proc = subprocess.run(
        [sys.executable, "-c", PEAK, str(BIN / "contrastive-train"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, int(proc.stdout.rsplit("peak_kb", 1)[1])


def test_a_run_over_pathological_samples_counts_each_and_keeps_its_memory(tmp_path):
    clean = [sample(i) for i in range(30)]
    mixed = [sample(i) for i in range(30)]
    for (key, (spoil, _)), s in zip(PATHOLOGICAL.items(), mixed[::3]):
        s["__key__"] = key
        spoil(s)
    _, clean_peak = train(write_dataset(tmp_path / "clean", clean), tmp_path / "clean-run")
    proc, mixed_peak = train(write_dataset(tmp_path / "mixed", mixed), tmp_path / "mixed-run")
    counts = [r for r in read_jsonl(tmp_path / "mixed-run" / "metrics.jsonl") if "loss" in r][-1]
    console = proc.stdout + proc.stderr
    for key, (_, counters) in PATHOLOGICAL.items():
        for counter in counters:
            assert counts.get(f"data/{counter}", 0) >= 1, (key, counter, {k: v for k, v in counts.items() if "/" in k})
        assert not counters or f"key {key}:" in console, key  # named in the log
    assert "DecompressionBombWarning" not in console  # Pillow's warning became the counted refusal
    assert "over the decode budget, by kind" in console
    assert mixed_peak < 1.5 * clean_peak, (mixed_peak, clean_peak)
    json.dumps(counts)  # every figure a plain number
