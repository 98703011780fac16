"""`contrastive-export`: a training checkpoint -> a self-contained export directory.

contrastive-export runs/demo/checkpoints/latest-or-step_dir runs/demo/export
contrastive-export runs/demo runs/demo/export          # the run's latest checkpoint
contrastive-export runs/demo s3://bucket/models/demo   # to object storage (any fsspec URL)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    """The command line this tool takes (also what tests/test_readme.py checks the README's examples against)."""
    parser = argparse.ArgumentParser(
        prog="contrastive-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory, or a run directory (its latest)")
    parser.add_argument("out_dir", help="a directory, or a URL (s3://bucket/models/mine, any fsspec URL)")
    parser.add_argument(
        "--ema", action="store_true", help="the weights' average (trainer.ema) instead of the live weights"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from contrastive.checkpoint import resolve_resume
    from contrastive.data.storage import check_no_secrets, is_remote, redact, upload_dir
    from contrastive.export import export_checkpoint

    path = resolve_resume(str(args.checkpoint), args.checkpoint)
    if not is_remote(args.out_dir):
        print(f"exported {path} to {export_checkpoint(path, Path(args.out_dir), ema=args.ema)}")
        return 0
    import tempfile

    check_no_secrets(args.out_dir, "contrastive-export")
    with tempfile.TemporaryDirectory() as local:
        files = upload_dir(export_checkpoint(path, Path(local) / "export", ema=args.ema), args.out_dir)
    print(f"exported {path} to {redact(args.out_dir)} ({files} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
