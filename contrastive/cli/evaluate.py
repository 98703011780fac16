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

DEFAULT_PROMPTS = ["a photo of {label}", "{label}"]


def load_model(path: Path):
    """An export directory, a training checkpoint or a run directory (its latest checkpoint) ->
    (model, the zero-shot prompts stored with it or None)."""
    from contrastive.export import CONFIG, load_pretrained

    if (path / CONFIG).exists():
        stored = json.loads((path / CONFIG).read_text()).get("eval", {}).get("prompts")
        return load_pretrained(path), stored or None
    from contrastive.builders import import_modules
    from contrastive.checkpoint import read_meta, resolve_resume
    from contrastive.engine import consolidated_state_dict
    from contrastive.model import ContrastiveModel

    checkpoint = resolve_resume(str(path), path)
    cfg = read_meta(checkpoint)["config"]
    import_modules(cfg.get("imports", []))
    model = ContrastiveModel.from_config({m: cfg["modality"].get(m) or {} for m in cfg["modalities"]},
                                         cfg["model"]["embed_dim"])
    weights = consolidated_state_dict(checkpoint)
    model.load_state_dict({k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")})
    return model.eval(), cfg.get("eval", {}).get("prompts")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="contrastive-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    from contrastive.distributed import init_distributed
    from contrastive.evaluate import compute_metrics, embed_dataset, format_table

    dist = init_distributed()
    model, stored_prompts = load_model(args.model)
    model.to(dist.device)
    prompts = args.prompts or stored_prompts or DEFAULT_PROMPTS
    dataset = build_dataset(args.data, model.modalities, batch_size=args.batch_size, train=False,
                            num_workers=args.workers, rank=dist.rank, world_size=dist.world_size)
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
