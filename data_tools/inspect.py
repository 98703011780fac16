"""Check and describe a dataset in the shard format.

    contrastive-data verify DATA [--max-bad-fraction 0] [--json report.json]
    contrastive-data stats DATA [--max-samples N] [--write-sizes]

DATA is any dataset location training takes: a directory, a URL (s3://, gs://, https://...), a brace
list or pipe:COMMAND.

`verify` decodes and preprocesses every sample with the decoders training uses (the registered
modalities at their default settings) and reports counts per modality, every corrupt sample by
shard, key and reason, unreadable or truncated shards, and shards whose sample count differs from
sizes.json. `stats` reports modality coverage, audio durations, image sizes, caption lengths and
labels, from headers where it can (no full decoding); `--write-sizes` counts every shard and writes
sizes.json beside them (what exact epochs on a dataset without one need).
"""

from __future__ import annotations

import io
import json
import statistics
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any

from contrastive.data.decode import known_extensions
from contrastive.data.shards import SIZES_FILE, locate
from contrastive.data.sources import iter_tar_samples
from contrastive.data.storage import STORAGE_OPTIONS, basename, configure_storage, read_bytes, redact
from contrastive.data.tar import MAX_MEMBER
from contrastive.data_tools.shards import extension_kinds
from contrastive.modalities import MODALITIES, build_modality


def _modalities() -> dict[str, Any]:
    """The registered modalities that read some extension (of two reading one, the first registered)."""
    owners = set(extension_kinds().values())
    return {name: build_modality(name) for name in MODALITIES if name in owners}


def _worker_init(storage_options: dict[str, Any]) -> None:
    """Worker processes decode one sample at a time: torch's thread pools in each would oversubscribe
    the cores (4x slower on 2 cores with 2 workers). They read with the parent's storage options."""
    import torch

    torch.set_num_threads(1)
    configure_storage(storage_options)


def verify_shard(path: str, max_member: int = MAX_MEMBER) -> dict[str, Any]:
    """One shard's report: samples, per-modality present/corrupt, corrupt entries, shard error."""
    modalities = _modalities()
    known = known_extensions()
    report: dict[str, Any] = {
        "shard": basename(path),
        "samples": 0,
        "present": Counter(),
        "corrupt": Counter(),
        "bad": [],
        "unknown_extensions": Counter(),
        "error": None,
    }
    try:
        for sample in iter_tar_samples(path, max_member=max_member):
            report["samples"] += 1
            key = sample["__key__"]
            for ext in sample:
                if not ext.startswith("__") and ext not in known:
                    report["unknown_extensions"][ext] += 1
            usable = 0
            for name, m in modalities.items():
                ext = next((e for e in m.extensions if e in sample), None)
                if ext is None:
                    continue
                report["present"][name] += 1
                try:
                    m.preprocess(m.decode(sample[ext], ext), train=False)
                    usable += 1
                except Exception as e:  # noqa: BLE001 - reported, as training would skip it
                    report["corrupt"][name] += 1
                    report["bad"].append(
                        {
                            "shard": report["shard"],
                            "key": key,
                            "modality": name,
                            "reason": f"{ext}: {type(e).__name__}: {e}",
                        }
                    )
            if "json" in sample:
                try:
                    json.loads(sample["json"].decode("utf-8"))
                except ValueError as e:
                    report["bad"].append({"shard": report["shard"], "key": key, "modality": "json", "reason": repr(e)})
            if not usable:
                report["corrupt"]["empty_sample"] += 1
                report["bad"].append(
                    {"shard": report["shard"], "key": key, "modality": "-", "reason": "no usable modality"}
                )
    except (tarfile.TarError, OSError, EOFError) as e:
        what = "truncated" if report["samples"] else "unreadable"
        report["error"] = f"{what} after {report['samples']} samples: {type(e).__name__}: {redact(str(e))}"
    return report


def verify(
    directory: str, *, workers: int = 2, max_bad_fraction: float = 0.0, max_member: int = MAX_MEMBER
) -> tuple[dict[str, Any], bool]:
    """(report, ok). ok is False when a shard is broken, sizes.json is wrong, or the fraction of
    corrupt samples exceeds `max_bad_fraction`."""
    tars, sizes_at = locate(directory)
    if not tars:
        raise FileNotFoundError(f"{redact(directory)} holds no .tar shards")
    with ProcessPoolExecutor(
        max_workers=max(1, workers), initializer=_worker_init, initargs=(dict(STORAGE_OPTIONS),)
    ) as pool:
        shards = list(pool.map(partial(verify_shard, max_member=max_member), tars))
    sizes: dict[str, Any] = {}
    problems = []
    try:
        sizes = json.loads(read_bytes(sizes_at)) if sizes_at else {}
    except FileNotFoundError:
        problems.append(f"{SIZES_FILE} is missing")
    except ValueError as e:
        problems.append(f"{SIZES_FILE} is unreadable: {e}")
    mismatch = {
        s["shard"]: {"sizes_json": sizes.get(s["shard"]), "actual": s["samples"]}
        for s in shards
        if sizes and sizes.get(s["shard"]) != s["samples"]
    }
    extra = sorted(set(sizes) - {s["shard"] for s in shards}) if sizes else []
    total = sum(s["samples"] for s in shards)
    bad_samples = len({(b["shard"], b["key"]) for s in shards for b in s["bad"]})
    report = {
        "directory": redact(directory),
        "shards": len(shards),
        "samples": total,
        "present": dict(sum((s["present"] for s in shards), Counter())),
        "corrupt": dict(sum((s["corrupt"] for s in shards), Counter())),
        "bad_samples": bad_samples,
        "bad": [b for s in shards for b in s["bad"]],
        "broken_shards": {s["shard"]: s["error"] for s in shards if s["error"]},
        "sizes_mismatch": mismatch,
        "sizes_json_lists_missing_shards": extra,
        "unknown_extensions": dict(sum((s["unknown_extensions"] for s in shards), Counter())),
        "problems": problems,
    }
    ok = (
        not report["broken_shards"]
        and not mismatch
        and not extra
        and not problems
        and bad_samples <= max_bad_fraction * max(total, 1)
    )
    return report, ok


def format_verify(report: dict[str, Any], ok: bool, show: int = 20) -> str:
    lines = [f"{report['directory']}: {report['samples']} samples in {report['shards']} shards"]
    for name, n in sorted(report["present"].items()):
        lines.append(f"  {name:<8} {n:>8} present  {report['corrupt'].get(name, 0):>6} corrupt")
    if report["corrupt"].get("empty_sample"):
        lines.append(f"  {report['corrupt']['empty_sample']} samples with no usable modality")
    lines.append(f"  bad samples: {report['bad_samples']} ({report['bad_samples'] / max(report['samples'], 1):.2%})")
    for b in report["bad"][:show]:
        lines.append(f"    {b['shard']} {b['key']} [{b['modality']}] {b['reason']}")
    if len(report["bad"]) > show:
        lines.append(f"    ... {len(report['bad']) - show} more (--json writes them all)")
    for shard, error in report["broken_shards"].items():
        lines.append(f"  broken shard {shard}: {error}")
    for shard, m in report["sizes_mismatch"].items():
        lines.append(f"  {SIZES_FILE} says {m['sizes_json']} samples for {shard}, it holds {m['actual']}")
    for shard in report["sizes_json_lists_missing_shards"]:
        lines.append(f"  {SIZES_FILE} lists {shard}, which does not exist")
    if report["unknown_extensions"]:
        lines.append(f"  extensions no modality reads: {report['unknown_extensions']}")
    lines += [f"  {p}" for p in report["problems"]]
    lines.append("OK" if ok else "FAILED")
    return "\n".join(lines)


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


class _Description:
    """What `stats` gathers, sample by sample (from headers where it can: no full decoding)."""

    def __init__(self):
        self.kinds = extension_kinds()
        self.samples = 0
        self.coverage: Counter = Counter()
        self.labels: Counter = Counter()
        self.durations, self.widths, self.heights, self.words = [], [], [], []

    def add(self, sample: dict[str, Any]) -> None:
        import soundfile
        from PIL import Image

        self.samples += 1
        for ext, value in sample.items():
            kind = self.kinds.get(ext)
            if kind:
                self.coverage[kind] += 1
            try:
                if kind == "audio":
                    info = soundfile.info(io.BytesIO(value))
                    self.durations.append(info.frames / info.samplerate)
                elif kind == "image":
                    w, h = Image.open(io.BytesIO(value)).size
                    self.widths.append(w)
                    self.heights.append(h)
                elif kind == "text":
                    self.words.append(len(value.decode("utf-8").split()))
                elif ext == "json":
                    label = json.loads(value).get("label")
                    if label is not None:
                        self.labels[str(label)] += 1
            except Exception:  # noqa: BLE001 - `verify` reports corrupt data; stats describe the rest
                pass


def stats(directory: str, *, max_samples: int = 0) -> dict[str, Any]:
    """Coverage, audio durations (s), image sizes (pixels), caption lengths (words), labels, and the
    shards whose tar is damaged (described up to the damage, as the loader reads them)."""
    d = _Description()
    broken: dict[str, str] = {}
    for tar in locate(directory)[0]:
        try:
            for sample in iter_tar_samples(tar):
                d.add(sample)
                if max_samples and d.samples >= max_samples:
                    break
        except (tarfile.TarError, OSError, EOFError) as e:  # what the loader counts as a broken shard
            broken[basename(tar)] = f"{type(e).__name__}: {redact(str(e))}"
        if max_samples and d.samples >= max_samples:
            break
    return {
        "samples": d.samples,
        "coverage": {k: d.coverage[k] / max(d.samples, 1) for k in _modalities()},
        "audio_seconds": _summary(d.durations),
        "image_width": _summary(d.widths),
        "image_height": _summary(d.heights),
        "caption_words": _summary(d.words),
        "labels": len(d.labels),
        "top_labels": dict(d.labels.most_common(10)),
        "broken_shards": broken,
    }


def format_stats(s: dict[str, Any]) -> str:
    lines = [f"{s['samples']} samples"]
    lines += [f"  {k:<8} in {v:6.1%} of samples" for k, v in s["coverage"].items()]
    for key, unit in (
        ("audio_seconds", "s"),
        ("image_width", "px"),
        ("image_height", "px"),
        ("caption_words", "words"),
    ):
        v = s[key]
        if v:
            lines.append(f"  {key:<14} min {v['min']:.3g}  median {v['median']:.3g}  max {v['max']:.3g} {unit}")
    lines.append(f"  {s['labels']} labels; most frequent: {s['top_labels']}")
    lines += [f"  broken shard {shard}: {error}" for shard, error in s.get("broken_shards", {}).items()]
    return "\n".join(lines)
