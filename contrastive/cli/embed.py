"""`contrastive-embed`: embed a dataset with an exported model; search the embeddings.

    contrastive-embed embed runs/demo/export --data data/demo/heldout --out emb/heldout
    contrastive-embed embed runs/demo/export --manifest pairs.csv --out emb/mine --modalities image text
    torchrun --nproc_per_node 4 $(which contrastive-embed) embed runs/demo/export --data big/ --out emb/big
    contrastive-embed search --index emb/heldout --query "the digit seven" --modality audio
    contrastive-embed search --index emb/heldout --query clip.flac --query-modality audio --modality image
    contrastive-embed index emb/heldout --out idx/heldout     # a faiss index per modality (IVF when large)
    contrastive-embed serve idx/heldout                       # the API and a web page on 127.0.0.1:8000

Rerunning `embed` after an interruption skips the shards already finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def embed(args) -> int:
    from contrastive.data.shards import list_shards
    from contrastive.data.storage import redact
    from contrastive.distributed import barrier, init_distributed
    from contrastive.embed import embed_shards

    dist = init_distributed()
    data = args.data
    if data and "://" not in data and not data.startswith("pipe:"):
        data = str(Path(data).resolve())  # recorded in embed.json: `index` reads the shards from anywhere
    if args.manifest:
        from contrastive.data_tools.shards import build_shards

        data = args.out / "source_shards"
        if dist.is_main and not (data / "sizes.json").exists():
            build_shards(data, manifest=str(args.manifest), max_count=args.shard_size, workers=2)
        barrier()
    from contrastive.export import OPEN_CLIP, load_model_spec

    spec = str(args.model) if str(args.model).startswith(OPEN_CLIP) else str(Path(args.model).resolve())
    model, scales = load_model_spec(spec)
    model.to(dist.device)
    modalities = args.modalities or list(model.modalities)
    unknown = [m for m in modalities if m not in model.modalities]
    if unknown:
        print(f"contrastive-embed: the model has no {unknown} tower (it has {list(model.modalities)})", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        (args.out / "embed.json").write_text(
            json.dumps(
                {"model": spec, "data": redact(str(data)), "modalities": modalities, "logit_scale": scales},
                indent=1,
            )
            + "\n"
        )
    result = embed_shards(
        model,
        list_shards(data),
        args.out,
        modalities=modalities,
        batch_size=args.batch_size,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    print(
        f"rank {dist.rank}: embedded {result['embedded']} shards, skipped {result['skipped']} finished ones "
        f"-> {args.out}"
    )
    barrier()
    return 0


def search(args) -> int:
    import numpy as np

    from contrastive.embed import load_embeddings, nearest
    from contrastive.export import load_model_spec

    meta = json.loads((args.index / "embed.json").read_text())
    model, _ = load_model_spec(str(args.model or meta["model"]))
    index, keys, labels = load_embeddings(args.index, args.modality)
    queries = model.embed(args.query_modality, args.query).numpy().astype(np.float32)
    scores, top = nearest(index, queries, args.k)
    for query, row_scores, row_top in zip(args.query, scores, top):
        print(f"{args.query_modality} {query!r} -> nearest {args.modality} of {len(keys)}:")
        for score, i in zip(row_scores, row_top):
            label = f"  [{labels[i]}]" if labels[i] is not None else ""
            print(f"  {score:7.4f}  {keys[i]}{label}")
    return 0


def index(args) -> int:
    from contrastive.search import build_index

    info = build_index(args.embeddings, args.out, exact_below=args.exact_below)
    for modality, meta in info["modalities"].items():
        print(f"{modality}: {meta['rows']} rows, {meta['kind']}")
    print(f"index in {args.out}; serve it with: contrastive-embed serve {args.out}")
    return 0


def serve(args) -> int:
    from contrastive.serve import serve as run_server

    run_server(
        str(args.index),
        args.model,
        host=args.host,
        port=args.port,
        upload_mb=args.upload_mb,
        max_k=args.max_k,
        max_query_chars=args.max_query_chars,
        allow_hosts=args.allow_host,
    )
    return 0


def parser() -> argparse.ArgumentParser:
    """The command line this tool takes (also what tests/test_readme.py checks the README's examples against)."""
    parser = argparse.ArgumentParser(
        prog="contrastive-embed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("embed", help="embed every sample of a dataset, per modality")
    e.add_argument(
        "model", type=Path, help="an export directory, a checkpoint or a run directory, or open_clip:<name>:<tag>"
    )
    source = e.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a dataset: a directory of shards, a URL, a brace list or pipe:COMMAND")
    source.add_argument("--manifest", type=Path, help="a CSV/JSONL manifest (made into shards under --out first)")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--modalities", nargs="+", help="default: every modality of the model")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--shard-size", type=int, default=1000, help="with --manifest: samples per shard")
    s = sub.add_parser("search", help="nearest neighbours of a query among embedded samples")
    s.add_argument("--index", type=Path, required=True, help="the --out directory of `embed`")
    s.add_argument("--query", nargs="+", required=True, help="captions, or file paths for other modalities")
    s.add_argument("--query-modality", default="text")
    s.add_argument("--modality", required=True, help="the modality to search among")
    s.add_argument("--model", help="default: the model the index was made with")
    s.add_argument("-k", "--k", type=int, default=5)
    i = sub.add_parser("index", help="a faiss index per modality over `embed`'s output, for `serve`")
    i.add_argument("embeddings", type=Path, help="the --out directory of `embed`")
    i.add_argument("--out", type=Path, required=True)
    i.add_argument("--exact-below", type=int, default=100_000, help="exact search up to this many rows, IVF above")
    v = sub.add_parser("serve", help="the search API and web page over an index")
    v.add_argument("index", type=Path, help="the --out directory of `index`")
    v.add_argument("--model", help="default: the model the embeddings were made with")
    v.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1: this machine only")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--upload-mb", type=float, default=10.0, help="largest upload accepted")
    v.add_argument("--max-k", type=int, default=100)
    v.add_argument("--max-query-chars", type=int, default=1000)
    v.add_argument(
        "--allow-host",
        action="append",
        default=[],
        help="a name this server may be reached by besides the address it binds (the Host header it accepts)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # which CPU instructions its loader picked
    return {"embed": embed, "search": search, "index": index, "serve": serve}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
