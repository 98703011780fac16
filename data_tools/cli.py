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

from contrastive.data_tools.curate_cli import CURATION, curation


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
    curation(sub)  # score, filter, balance, dedup, pollute
    return p


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


COMMANDS = {
    "demo": run_demo,
    "emoji": run_emoji,
    "shards": run_shards,
    "verify": run_verify,
    "benchmark": run_benchmark,
    "stats": run_stats,
    **CURATION,
}


if __name__ == "__main__":
    sys.exit(main())
