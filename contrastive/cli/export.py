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
    parser = argparse.ArgumentParser(prog="contrastive-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory, or a run directory (its latest)")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from contrastive.checkpoint import read_meta, resolve_resume
    from contrastive.cli.evaluate import load_model
    from contrastive.engine import consolidated_state_dict
    from contrastive.export import export_model

    path = resolve_resume(str(args.checkpoint), args.checkpoint)
    meta = read_meta(path)
    cfg = meta["config"]
    model, prompts = load_model(path)
    max_scale = cfg["loss"]["temperature"]["max_logit_scale"]
    scales = {k.removeprefix("loss.logit_scale."): float(v.exp().clamp(max=max_scale))
              for k, v in consolidated_state_dict(path).items() if k.startswith("loss.logit_scale.")}
    out = export_model(model, args.out_dir, logit_scales=scales, prompts=prompts,
                       info={"steps": meta["step"], "train_data": cfg["data"]["train"], "checkpoint": str(path)})
    print(f"exported {path} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
