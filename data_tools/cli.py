"""`contrastive-data`: make and inspect datasets in the shard format.

    contrastive-data demo data/demo        # the built-in demo set (train + heldout splits)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="contrastive-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write the demo data set (spoken, written and captioned digits)")
    demo.add_argument("out_dir")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--copies", type=int, default=2, help="training samples per digit image")
    demo.add_argument("--max-images", type=int, default=0, help="cap on training images (0 = all 1437)")
    demo.add_argument("--shard-size", type=int, default=400, help="samples per shard")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.command == "demo":
        from data_tools.demo import build_demo

        start = time.time()
        counts = build_demo(args.out_dir, seed=args.seed, copies=args.copies, max_images=args.max_images,
                            shard_size=args.shard_size)
        print(f"demo data in {args.out_dir}: " + ", ".join(f"{k} {v} samples" for k, v in counts.items())
              + f" ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
