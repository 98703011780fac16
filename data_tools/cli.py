"""`contrastive-data`: make and inspect datasets in the shard format.

contrastive-data demo data/demo                        # the built-in demo set (train + heldout)
contrastive-data emoji data/emoji                      # a harder set: emoji names, unseen concepts held out
contrastive-data shards OUT --manifest pairs.csv       # columns key,image,audio,text,text_path,label
contrastive-data shards OUT --folder raw/ --workers 8  # files paired by stem: dog.jpg dog.flac dog.txt
contrastive-data verify OUT                            # decode everything; non-zero exit if corrupt
contrastive-data stats OUT                             # coverage, durations, sizes, caption lengths
contrastive-data stats s3://bucket/data --write-sizes  # count the shards once, write their sizes.json

Wherever a dataset is read (verify, stats), it may be a URL (s3://, gs://, https://..., any fsspec
URL), a brace list (https://host/d/part-{000..099}.tar) or pipe:COMMAND, as for training.
contrastive-data benchmark OUT --manifest m.csv --task classification --templates openai-imagenet
                                                       # an eval set in CLIP_benchmark's layout

Curation (a new set out, the source untouched; see contrastive/data_tools/curate.py):
contrastive-data score SRC --model EXPORT --out scores/            # each sample's pair cosines
contrastive-data filter SRC DST --scores scores/ --keep 'image-text>=0.28'   # or --top 70%
contrastive-data balance SRC DST --concepts entries.txt --t 20000  # MetaCLIP's cap per concept entry
contrastive-data dedup SRC --against EVAL --model EXPORT --out DST # duplicates and test-set leaks
contrastive-data pollute SRC DST --against EVAL                    # plant known problems, to measure
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="contrastive-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write the demo data set (spoken, written and captioned digits)")
    demo.add_argument("out_dir")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--copies", type=int, default=2, help="training samples per digit image")
    demo.add_argument("--max-images", type=int, default=0, help="cap on training images (0 = all 1437)")
    demo.add_argument("--shard-size", type=int, default=400, help="samples per shard")

    emoji = sub.add_parser("emoji", help="write the emoji set (unseen concepts held out; benchmarks/quality.py)")
    emoji.add_argument("out_dir")
    emoji.add_argument("--seed", type=int, default=0)
    emoji.add_argument("--copies", type=int, default=4, help="training samples per concept")
    emoji.add_argument("--heldout-copies", type=int, default=2, help="held-out samples per concept")
    emoji.add_argument("--heldout-fraction", type=float, default=0.2, help="share of concepts held out")
    emoji.add_argument("--size", type=int, default=64, help="image side in pixels")
    emoji.add_argument("--max-concepts", type=int, default=0, help="cap on concepts (0 = all, about 1,350)")
    emoji.add_argument("--shard-size", type=int, default=500, help="samples per shard")

    shards = sub.add_parser("shards", help="build shards from a manifest or a folder")
    shards.add_argument("out_dir")
    source = shards.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="CSV or JSONL; paths relative to the manifest's directory")
    source.add_argument("--folder", help="files paired by stem (relative path without extension)")
    shards.add_argument("--prefix", default="part")
    shards.add_argument("--max-count", type=int, default=1000, help="samples per shard at most")
    shards.add_argument("--max-bytes", type=float, default=1e9, help="bytes per shard at most")
    shards.add_argument("--workers", type=int, default=4)

    verify = sub.add_parser("verify", help="decode every sample; exit 1 if anything is corrupt")
    verify.add_argument("directory")
    verify.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.0,
        help="corrupt samples tolerated before the exit code is 1 (default: none)",
    )
    verify.add_argument("--workers", type=int, default=2)
    verify.add_argument(
        "--max-member-mb",
        type=int,
        default=1024,
        help="a tar member claiming more makes its shard broken, as data.max_member_mb does for training",
    )
    verify.add_argument("--json", type=Path, help="write the full report here")

    bench = sub.add_parser("benchmark", help="an eval set in CLIP_benchmark's WebDataset layout, from a manifest")
    bench.add_argument("out_dir")
    bench.add_argument("--manifest", required=True, help="CSV or JSONL: key,image,audio,text,text_path,label,group")
    bench.add_argument("--task", required=True, choices=["classification", "retrieval"])
    bench.add_argument("--classnames", help="class names, one a line, in class-index order (default: sorted labels)")
    bench.add_argument("--templates", help="templates with {c}, one a line, or openai-imagenet (CLIP's 80)")
    bench.add_argument("--split", default="test")
    bench.add_argument("--max-count", type=int, default=1000, help="samples per shard at most")

    stats = sub.add_parser("stats", help="coverage, audio durations, image sizes, caption lengths")
    stats.add_argument("directory")
    stats.add_argument(
        "--max-samples",
        type=int,
        default=None,
        help="describe the first N samples (default: all; 1000 with --write-sizes)",
    )
    stats.add_argument("--json", type=Path)
    stats.add_argument(
        "--write-sizes",
        action="store_true",
        help="count every shard's samples and write sizes.json beside them (a URL too): exact epochs need it",
    )
    curation(sub)
    return p


def curation(sub) -> None:
    workers = {"type": int, "default": 2, "help": "processes, one shard each (the output does not depend on it)"}
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
    filt.add_argument("--keep", action="append", default=[], help="PAIR>=VALUE, e.g. 'image-text>=0.28'")
    filt.add_argument("--top", action="append", default=[], help="[PAIR:]SHARE, e.g. 70%%: the best-scored share")
    filt.add_argument("--missing", choices=["keep", "drop"], default="keep", help="samples without the pair's score")
    filt.add_argument("--workers", **workers)

    bal = sub.add_parser("balance", help="cap each concept entry's samples at about t (MetaCLIP)")
    bal.add_argument("source")
    bal.add_argument("out_dir")
    bal.add_argument("--concepts", required=True, help="entries, one a line, matched in the captions")
    bal.add_argument("--t", type=int, required=True, help="samples kept per entry at most, about")
    bal.add_argument("--seed", type=int, default=0)
    bal.add_argument("--word", action="store_true", help="match whole words only (default: substrings, as MetaCLIP)")
    bal.add_argument("--keep-unmatched", action="store_true", help="keep samples that match no entry")
    bal.add_argument("--workers", **workers)

    dd = sub.add_parser("dedup", help="duplicates within a set and leaks of evaluation sets into it")
    dd.add_argument("source")
    dd.add_argument("--against", nargs="*", default=[], help="evaluation sets that must not leak into the source")
    dd.add_argument("--model", help="an export etc.: near copies by embedding (without: exact copies only)")
    dd.add_argument("--modality", default="image", help="what a copy is judged on (default: image)")
    dd.add_argument("--threshold", type=float, default=0.95, help="cosine from which two samples are copies")
    dd.add_argument("--out", help="write a copy without the duplicates and leaks here")
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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from contrastive.data.shards import DataError

    try:
        return run(args)
    except (DataError, OSError, RuntimeError) as e:  # RuntimeError: a missing Debian package, named
        print(f"contrastive-data {args.command}: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    return COMMANDS[args.command](args, time.time())


def written(what: str, out_dir: str, counts: dict[str, int], start: float) -> int:
    splits = ", ".join(f"{k} {v} samples" for k, v in counts.items())
    print(f"{what} data in {out_dir}: {splits} ({time.time() - start:.0f} s)")
    return 0


def run_demo(args: argparse.Namespace, start: float) -> int:
    from contrastive.data_tools.demo import build_demo

    counts = build_demo(
        args.out_dir, seed=args.seed, copies=args.copies, max_images=args.max_images, shard_size=args.shard_size
    )
    return written("demo", args.out_dir, counts, start)


def run_emoji(args: argparse.Namespace, start: float) -> int:
    from contrastive.data_tools.emoji import build_emoji

    counts = build_emoji(
        args.out_dir,
        seed=args.seed,
        copies=args.copies,
        heldout_copies=args.heldout_copies,
        heldout_fraction=args.heldout_fraction,
        size=args.size,
        max_concepts=args.max_concepts,
        shard_size=args.shard_size,
    )
    return written("emoji", args.out_dir, counts, start)


def run_shards(args: argparse.Namespace, start: float) -> int:
    from contrastive.data_tools.shards import build_shards

    try:
        result = build_shards(
            args.out_dir,
            manifest=args.manifest,
            folder=args.folder,
            prefix=args.prefix,
            max_count=args.max_count,
            max_bytes=int(args.max_bytes),
            workers=args.workers,
        )
    except ValueError as e:
        print(f"contrastive-data shards: {e}", file=sys.stderr)
        return 2
    for skipped in result["skipped"][:20]:
        print(f"skipped {skipped}", file=sys.stderr)
    print(
        f"{sum(result['sizes'].values())} samples in {len(result['sizes'])} shards in {args.out_dir} "
        f"({time.time() - start:.0f} s)" + (f"; {len(result['skipped'])} files skipped" if result["skipped"] else "")
    )
    return 0


def run_verify(args: argparse.Namespace, start: float) -> int:
    from contrastive.data_tools.inspect import format_verify, verify

    report, ok = verify(
        args.directory,
        workers=args.workers,
        max_bad_fraction=args.max_bad_fraction,
        max_member=args.max_member_mb << 20,
    )
    print(format_verify(report, ok))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if ok else 1


def run_benchmark(args: argparse.Namespace, start: float) -> int:
    from contrastive.data_tools.benchmark import build_benchmark_set

    try:
        result = build_benchmark_set(
            args.out_dir,
            manifest=args.manifest,
            task=args.task,
            classnames=args.classnames,
            templates=args.templates,
            split=args.split,
            max_count=args.max_count,
        )
    except ValueError as e:
        print(f"contrastive-data benchmark: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.task} set in {args.out_dir}: {result['samples']} samples in {result['shards']} shards"
        + (f", {result['classes']} classes" if result["classes"] else "")
    )
    return 0


def run_stats(args: argparse.Namespace, start: float) -> int:
    from contrastive.data_tools.inspect import format_stats, stats

    if args.write_sizes:
        from contrastive.data.shards import write_sizes
        from contrastive.data.storage import redact

        sizes, where, damaged = write_sizes(args.directory)
        print(f"{sum(sizes.values())} samples in {len(sizes)} shards: wrote {redact(where)}")
        for name, error in damaged.items():
            print(f"  broken shard {name}: counted up to the damage ({sizes[name]} samples): {error}")
    limit = args.max_samples if args.max_samples is not None else (1000 if args.write_sizes else 0)
    result = stats(args.directory, max_samples=limit)
    print(format_stats(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def run_score(args: argparse.Namespace, start: float) -> int:
    from contrastive.data_tools.curate import score

    report = score(
        args.source, args.out, model=args.model, pairs=args.pair, workers=args.workers, batch_size=args.batch_size
    )
    for pair, s in report["pairs"].items():
        middle = f", median {s['quantiles']['50%']:.3f}, 10% {s['quantiles']['10%']:.3f}" if s["samples"] else ""
        print(f"{pair}: {s['samples']} samples scored{middle}")
    print(f"scores in {args.out} ({time.time() - start:.0f} s)")
    return 0


def curated(report: dict, out_dir: str, start: float) -> int:
    total = report["kept"] + report["dropped"]
    print(f"{report['command']}: kept {report['kept']} of {total} samples -> {out_dir} ({time.time() - start:.0f} s)")
    for name, error in report["broken_shards"].items():
        print(f"  broken shard {name}: kept what came before the damage: {error}")
    return 0


def run_filter(args: argparse.Namespace, start: float) -> int:
    from contrastive.data_tools.curate import filter_set

    report = filter_set(
        args.source,
        args.out_dir,
        scores_dir=args.scores,
        keep=args.keep,
        top=args.top,
        missing=args.missing,
        workers=args.workers,
    )
    print("conditions: " + ", ".join(report["conditions"]))
    return curated(report, args.out_dir, start)


def run_balance(args: argparse.Namespace, start: float) -> int:
    from contrastive.data_tools.curate import balance

    report = balance(
        args.source,
        args.out_dir,
        concepts=args.concepts,
        t=args.t,
        seed=args.seed,
        word=args.word,
        keep_unmatched=args.keep_unmatched,
        workers=args.workers,
    )
    head = ", ".join(f"{e} {c['before']}->{c['after']}" for e, c in list(report["per_entry"].items())[:5])
    print(
        f"{report['entries_matched']} of {report['entries']} entries matched; "
        f"{report['unmatched']} samples matched none; head: {head}"
    )
    return curated(report, args.out_dir, start)


def run_dedup(args: argparse.Namespace, start: float) -> int:
    from contrastive.data_tools.curate import dedup

    report = dedup(
        args.source,
        against=args.against,
        model=args.model,
        modality=args.modality,
        threshold=args.threshold,
        out=args.out,
        workers=args.workers,
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
    from contrastive.data_tools.curate import pollute

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
    )
    print(
        f"{planted['samples']} samples in {args.out_dir}: planted {len(planted['mismatched'])} mismatched captions, "
        f"{len(planted['duplicates'])} copies, {len(planted['near_duplicates'])} near copies, {len(planted['leaks'])} "
        "leaks (planted.json)"
    )
    return 0


COMMANDS = {
    "demo": run_demo,
    "emoji": run_emoji,
    "shards": run_shards,
    "verify": run_verify,
    "benchmark": run_benchmark,
    "stats": run_stats,
    "score": run_score,
    "filter": run_filter,
    "balance": run_balance,
    "dedup": run_dedup,
    "pollute": run_pollute,
}


if __name__ == "__main__":
    sys.exit(main())
