"""`contrastive-eval`: zero-shot classification, retrieval and linear probes of an exported model
(or a training checkpoint) on one or several eval sets, in our shard layout or CLIP_benchmark's.

    contrastive-eval runs/demo/export --data data/demo/heldout
    contrastive-eval runs/demo/checkpoints/step_00000500 --data data/demo/heldout --json metrics.json
    contrastive-eval runs/demo/export --set esc50=/data/esc50_wds --set coco=/data/coco_wds
    contrastive-eval runs/demo/export --data data/demo/heldout --task linear_probe --probe-train data/demo/train
    contrastive-eval runs/demo          # a run's latest checkpoint, on the sets it was evaluated on
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
    model, prompts, _ = load_model_and_config(path)
    return model, prompts


def load_model_and_config(path: Path):
    """(model, the zero-shot prompts stored with it or None, the training config for a checkpoint or None)."""
    from contrastive.export import CONFIG, load_pretrained, objective_from_checkpoint

    if (path / CONFIG).exists():
        stored = json.loads((path / CONFIG).read_text()).get("eval", {}).get("prompts")
        return load_pretrained(path), stored or None, None
    from contrastive.checkpoint import resolve_resume

    objective, meta = objective_from_checkpoint(resolve_resume(str(path), path))
    return objective.model, meta["config"].get("eval", {}).get("prompts"), meta["config"]


def requested_sets(args, training_config: dict | None) -> list:
    """The sets to score: --data (plain names), --set NAME=PATH and --sets FILE, with the set options of
    the command line; else those of the checkpoint's training run (its data.eval and eval.sets)."""
    from contrastive.evaluation import resolve_set

    options = {
        k: v
        for k, v in (
            ("task", args.task),
            ("split", args.split),
            ("classnames", args.classnames),
            ("templates", args.templates),
            ("probe_train", args.probe_train),
        )
        if v is not None
    }
    named: dict = {}
    if args.sets:
        from omegaconf import OmegaConf

        named.update(OmegaConf.to_container(OmegaConf.load(args.sets), resolve=True))
    for spec in args.set or []:
        name, _, path = spec.partition("=")
        if not name or not path:
            raise SystemExit(f"contrastive-eval: --set {spec!r}: expected NAME=PATH")
        named[name] = {"path": path}
    data = args.data
    if data is None and not named and training_config is not None:
        data, named = training_config["data"].get("eval"), dict(training_config["eval"].get("sets") or {})
    if data is None and not named:
        raise SystemExit("contrastive-eval: name a set: --data PATH, --set NAME=PATH or --sets FILE")
    sets = [resolve_set("", {"path": data, "max_samples": args.max_samples, **options}, where="--data")] if data else []
    return sets + [resolve_set(name, {**options, **fields}) for name, fields in named.items()]


def parser() -> argparse.ArgumentParser:
    """The command line this tool takes (also what tests/test_readme.py checks the README's examples against)."""
    parser = argparse.ArgumentParser(
        prog="contrastive-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="an export directory, a checkpoint or a run directory")
    parser.add_argument("--data", help="a set reported under plain names (our layout or CLIP_benchmark's)")
    parser.add_argument("--set", action="append", metavar="NAME=PATH", help="a named set (repeatable)")
    parser.add_argument("--sets", type=Path, help="a YAML file: {name: {path, task, split, ...}} (see EvalSet)")
    parser.add_argument("--task", help="auto | zeroshot_classification | retrieval | linear_probe (default auto)")
    parser.add_argument("--split", help="CLIP_benchmark layout: the split to score (default test)")
    parser.add_argument("--classnames", help="a file of class names, one a line")
    parser.add_argument("--templates", help="a file of zero-shot templates with {c} or {label}, one a line")
    parser.add_argument("--probe-train", help="the linear probe's training split")
    parser.add_argument("--prompts", nargs="+", help="zero-shot prompt templates with {label}")
    parser.add_argument("--text-modality", default="text")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--max-samples", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from contrastive.data.settings import DataConfig
    from contrastive.data.storage import redact
    from contrastive.distributed import init_distributed
    from contrastive.evaluation import DEFAULT_PROMPTS, EvalConfig, Evaluator, format_table

    dist = init_distributed()
    model, stored_prompts, training_config = load_model_and_config(args.model)
    model.to(dist.device)
    sets = requested_sets(args, training_config)
    settings = EvalConfig(
        prompts=args.prompts or stored_prompts or list(DEFAULT_PROMPTS),
        text_modality=args.text_modality,
        max_samples=args.max_samples,
    )
    evaluator = Evaluator(
        sets,
        model.modalities,
        settings,
        DataConfig(eval_batch_size=args.batch_size, num_workers=args.workers),
        rank=dist.rank,
        world_size=dist.world_size,
    )
    metrics, embedded = evaluator(model, dist.device)
    if dist.is_main:
        counts = ", ".join(
            f"{s.name or 'data'} {len(embedded[s.name]['keys'])} samples ({redact(s.shards)})"
            for s in sets
            if s.name in embedded
        )
        print(f"evaluation of {args.model}: {counts}")
        print(format_table(metrics))
        for name, error in evaluator.failed.items():
            print(f"FAILED eval set {name}: {error}", file=sys.stderr)
        if args.json:
            args.json.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return 1 if evaluator.failed else 0


if __name__ == "__main__":
    sys.exit(main())
