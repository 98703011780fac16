"""`contrastive-export`: a training checkpoint -> a self-contained export directory.

contrastive-export runs/demo/checkpoints/latest-or-step_dir runs/demo/export
contrastive-export runs/demo runs/demo/export          # the run's latest checkpoint
contrastive-export runs/demo s3://bucket/models/demo   # to object storage (any fsspec URL)
contrastive-export runs/demo runs/demo/hub --hub       # open_clip's hf-hub: layout (image and text towers)
    hf upload ORG/NAME runs/demo/hub      # then: open_clip.create_model_and_transforms("hf-hub:ORG/NAME")
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
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
    parser.add_argument(
        "--hub", action="store_true", help="open_clip's hf-hub: layout of the image-text towers (config, weights, card)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from contrastive.checkpoint import resolve_resume
    from contrastive.data.storage import check_no_secrets, is_remote, redact, upload_dir
    from contrastive.export import export_checkpoint, export_hub

    path = resolve_resume(str(args.checkpoint), args.checkpoint)
    remote = is_remote(args.out_dir)
    if remote:
        check_no_secrets(args.out_dir, "contrastive-export")
    layout = " in open_clip's hub layout" if args.hub else ""
    with tempfile.TemporaryDirectory() as local:
        local_out = Path(local) / "out" if remote else Path(args.out_dir)
        made = export_checkpoint(path, Path(local) / "export" if args.hub else local_out, ema=args.ema)
        if args.hub:
            try:
                made = export_hub(made, local_out)
            except ValueError as e:
                print(f"contrastive-export: {e}", file=sys.stderr)
                return 2
        if not remote:
            print(f"exported {path}{layout} to {made}")
            return 0
        files = upload_dir(made, args.out_dir)
    print(f"exported {path}{layout} to {redact(args.out_dir)} ({files} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
