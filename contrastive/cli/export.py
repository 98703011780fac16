"""`contrastive-export`: a training checkpoint -> a self-contained export directory.

contrastive-export runs/demo/checkpoints/latest-or-step_dir runs/demo/export
contrastive-export runs/demo runs/demo/export          # the run's latest checkpoint
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="contrastive-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory, or a run directory (its latest)")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from contrastive.checkpoint import resolve_resume
    from contrastive.export import export_checkpoint

    path = resolve_resume(str(args.checkpoint), args.checkpoint)
    out = export_checkpoint(path, args.out_dir)
    print(f"exported {path} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
