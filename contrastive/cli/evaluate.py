"""`contrastive-eval`: zero-shot accuracy and retrieval of an exported model (or a checkpoint) on eval shards.

contrastive-eval runs/demo/export --data data/demo/heldout
contrastive-eval runs/demo/checkpoints/step_00000500 --data data/demo/heldout --json metrics.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def load_model(path: Path):
    """An export directory, a training checkpoint or a run directory (its latest checkpoint) ->
    (model, the zero-shot prompts stored with it or None)."""
    from contrastive.export import CONFIG, load_pretrained, objective_from_checkpoint

    if (path / CONFIG).exists():
        stored = json.loads((path / CONFIG).read_text()).get("eval", {}).get("prompts")
        return load_pretrained(path), stored or None
    from contrastive.checkpoint import resolve_resume

    objective, meta = objective_from_checkpoint(resolve_resume(str(path), path))
    return objective.model, meta["config"].get("eval", {}).get("prompts")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="contrastive-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="an export directory or a checkpoint directory")
    parser.add_argument("--data", required=True, help="eval dataset directory (shards + sizes.json)")
    parser.add_argument("--prompts", nargs="+", help="zero-shot prompt templates with {label}")
    parser.add_argument("--text-modality", default="text")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--max-samples", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from contrastive.builders import build_dataset
    from contrastive.data.settings import DataConfig
    from contrastive.distributed import init_distributed
    from contrastive.evaluate import DEFAULT_PROMPTS, compute_metrics, embed_dataset, format_table

    dist = init_distributed()
    model, stored_prompts = load_model(args.model)
    model.to(dist.device)
    prompts = args.prompts or stored_prompts or list(DEFAULT_PROMPTS)
    dataset = build_dataset(
        args.data,
        model.modalities,
        DataConfig(eval_batch_size=args.batch_size, num_workers=args.workers),
        train=False,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    with torch.no_grad():
        embedded = embed_dataset(model, dataset, device=dist.device, max_samples=args.max_samples)
    metrics = compute_metrics(model, embedded, prompts=prompts, text_modality=args.text_modality)
    if dist.is_main:
        print(f"evaluation of {args.model} on {args.data} ({len(embedded['keys'])} samples)")
        print(format_table(metrics))
        if args.json:
            args.json.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
