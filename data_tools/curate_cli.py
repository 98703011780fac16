"""contrastive-data's curation commands: their arguments and how each reports (the work itself in
curate.py, scoring.py, balance.py, dedup.py and pollute.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def curation(sub) -> None:
    workers = {"type": int, "default": 2, "help": "processes, one shard each (the output does not depend on it)"}
    overwrite = {"action": "store_true", "help": "replace what an earlier curation command wrote there"}
    score = sub.add_parser("score", help="each sample's cosine score per modality pair, from a model")
    score.add_argument("source")
    score.add_argument("--model", required=True, help="an export, a checkpoint or run dir, or open_clip:NAME:TAG")
    score.add_argument("--out", required=True, type=Path)
    score.add_argument("--pair", action="append", default=[], help="image,text (repeatable; default: every pair)")
    score.add_argument("--batch-size", type=int, default=256)
    score.add_argument("--workers", **workers)

    filt = sub.add_parser("filter", help="a copy with the samples whose scores meet the conditions")
    filt.add_argument("source")
    filt.add_argument("out_dir")
    filt.add_argument("--scores", required=True, help="the --out of `score`")
    filt.add_argument(
        "--keep",
        action="append",
        default=[],
        help="PAIR>=VALUE, e.g. 'image-text>=0.7': a value on the scoring model's scale (`score` prints it)",
    )
    filt.add_argument("--top", action="append", default=[], help="[PAIR:]SHARE, e.g. 70%%: the best-scored share")
    filt.add_argument("--missing", choices=["keep", "drop"], default="keep", help="samples without the pair's score")
    filt.add_argument("--workers", **workers)
    filt.add_argument("--overwrite", **overwrite)

    bal = sub.add_parser("balance", help="cap each concept entry's samples at about t (MetaCLIP)")
    bal.add_argument("source")
    bal.add_argument("out_dir")
    bal.add_argument("--concepts", required=True, help="entries, one a line, matched in the captions")
    bal.add_argument("--t", type=int, required=True, help="samples kept per entry at most, about")
    bal.add_argument("--seed", type=int, default=0)
    bal.add_argument("--word", action="store_true", help="match whole words only (default: substrings, as MetaCLIP)")
    bal.add_argument("--keep-unmatched", action="store_true", help="keep samples that match no entry")
    bal.add_argument("--workers", **workers)
    bal.add_argument("--overwrite", **overwrite)

    dd = sub.add_parser("dedup", help="duplicates within a set and leaks of evaluation sets into it")
    dd.add_argument("source")
    dd.add_argument("--against", nargs="*", default=[], help="evaluation sets that must not leak into the source")
    dd.add_argument("--model", help="an export etc.: near copies by embedding (without: exact copies only)")
    dd.add_argument("--modality", default="image", help="what a copy is judged on (default: image)")
    dd.add_argument(
        "--threshold",
        type=float,
        help="cosine of the judged modality's embeddings from which two samples are near copies (default 0.999; "
        "it belongs to the model: a model that tells little apart puts whole classes above 0.95)",
    )
    dd.add_argument("--out", help="write a copy without the duplicates and leaks here")
    dd.add_argument("--work", type=Path, help="scratch for the embeddings (default: a temporary directory)")
    dd.add_argument("--overwrite", **overwrite)
    dd.add_argument("--report", type=Path, help="the report's path (default: OUT/curation.json, else printed)")
    dd.add_argument("--workers", **workers)

    pol = sub.add_parser("pollute", help="a copy with known problems planted (planted.json), to measure curation")
    pol.add_argument("source")
    pol.add_argument("out_dir")
    pol.add_argument("--against", help="an evaluation set to leak samples of")
    pol.add_argument("--mismatch", type=float, default=0.2, help="share of captions swapped for another label's")
    pol.add_argument("--duplicates", type=float, default=0.05, help="exact copies, as a share of the samples")
    pol.add_argument("--near-duplicates", type=float, default=0.05, help="copies with the image nudged")
    pol.add_argument("--leaks", type=int, default=20, help="samples of --against copied in")
    pol.add_argument("--shard-size", type=int, default=400)
    pol.add_argument("--seed", type=int, default=0)
    pol.add_argument("--overwrite", **overwrite)


def run_score(args: argparse.Namespace, start: float) -> int:
    from contrastive.data_tools.scoring import score

    report = score(
        args.source, args.out, model=args.model, pairs=args.pair, workers=args.workers, batch_size=args.batch_size
    )
    for pair, s in report["pairs"].items():
        middle = f", median {s['quantiles']['50%']:.3f}, 10% {s['quantiles']['10%']:.3f}" if s["samples"] else ""
        print(f"{pair}: {s['samples']} samples scored{middle}")
    print(f"scores in {args.out} ({time.time() - start:.0f} s)")
    return 0


# what to look at when a command drops most of a set
LOOK_AT = {
    "filter": "the conditions: a threshold belongs to the model that scored (the scores' range is above, "
    "their histogram in filter.png)",
    "balance": "--t, samples kept per concept entry (balance.png shows each entry before and after)",
    "dedup": "--threshold: with a model that tells little apart, whole classes embed above it (dedup.png)",
}


def curated(report: dict, out_dir: str, start: float) -> int:
    total = report["kept"] + report["dropped"]
    print(f"{report['command']}: kept {report['kept']} of {total} samples -> {out_dir} ({time.time() - start:.0f} s)")
    for name, error in report["broken_shards"].items():
        print(f"  broken shard {name}: kept what came before the damage: {error}")
    if report["dropped"] > total / 2:
        print(
            f"warning: {report['command']} dropped {report['dropped']} of {total} samples "
            f"({report['dropped'] / total:.0%}), more than half the set; check {LOOK_AT[report['command']]}",
            file=sys.stderr,
        )
    return 0


def run_filter(args: argparse.Namespace, start: float) -> int:
    from contrastive.data_tools.scoring import filter_set

    report = filter_set(
        args.source,
        args.out_dir,
        scores_dir=args.scores,
        keep=args.keep,
        top=args.top,
        missing=args.missing,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    print("conditions: " + ", ".join(report["conditions"]))
    for pair, s in report["scores"].items():
        if s["samples"]:
            q = s["quantiles"]
            print(f"{pair} scores: min {s['min']:.3f}, 10% {q['10%']:.3f}, median {q['50%']:.3f}, max {s['max']:.3f}")
    return curated(report, args.out_dir, start)


def run_balance(args: argparse.Namespace, start: float) -> int:
    from contrastive.data_tools.balance import balance

    report = balance(
        args.source,
        args.out_dir,
        concepts=args.concepts,
        t=args.t,
        seed=args.seed,
        word=args.word,
        keep_unmatched=args.keep_unmatched,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    head = ", ".join(f"{e} {c['before']}->{c['after']}" for e, c in list(report["per_entry"].items())[:5])
    print(
        f"{report['entries_matched']} of {report['entries']} entries matched; "
        f"{report['unmatched']} samples matched none; head: {head}"
    )
    return curated(report, args.out_dir, start)


def run_dedup(args: argparse.Namespace, start: float) -> int:
    from contrastive.data_tools.dedup import dedup

    report = dedup(
        args.source,
        against=args.against,
        model=args.model,
        modality=args.modality,
        threshold=args.threshold,
        out=args.out,
        work=args.work,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    if args.report:
        args.report.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    for kind in ("duplicates", "leaks"):
        for f in report[kind][:10]:
            where = f" of {f['set']}" if "set" in f else ""
            print(f"{kind[:-1]} ({f['kind']}, {f['score']:.3f}): {f['shard']}/{f['key']} copies {f['of']}{where}")
    print(
        f"{report['samples']} samples: {len(report['duplicates'])} duplicates, {len(report['leaks'])} leaks "
        f"({', '.join(f'{k} {v}' for k, v in sorted(report['counts'].items())) or 'none'})"
    )
    return curated(report, args.out, start) if args.out else 0


def run_pollute(args: argparse.Namespace, start: float) -> int:
    from contrastive.data_tools.pollute import pollute

    planted = pollute(
        args.source,
        args.out_dir,
        against=args.against,
        mismatch=args.mismatch,
        duplicates=args.duplicates,
        near_duplicates=args.near_duplicates,
        leaks=args.leaks,
        shard_size=args.shard_size,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(
        f"{planted['samples']} samples in {args.out_dir}: planted {len(planted['mismatched'])} mismatched captions, "
        f"{len(planted['duplicates'])} copies, {len(planted['near_duplicates'])} near copies, {len(planted['leaks'])} "
        "leaks (planted.json)"
    )
    return 0


CURATION = {
    "score": run_score,
    "filter": run_filter,
    "balance": run_balance,
    "dedup": run_dedup,
    "pollute": run_pollute,
}
