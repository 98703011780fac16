"""Does curation find what is wrong with a set, and does training on the curated set pay? The demo
set (one sample per digit image) with known problems planted by `contrastive-data pollute`:
captions swapped for another digit's, exact and near copies, held-out samples leaked into train.

1. a scorer: the demo recipe trained on the polluted set itself (no outside model: the majority of
   its pairs are right, so it learns what a right pair looks like);
2. `score` + `filter --top image-text:<1 - mismatch>`: precision and recall of the dropped samples
   against the planted swaps;
3. `dedup --against heldout --model <scorer>` at several thresholds: recall of the planted copies
   and leaks, and how many other pairs it calls copies;
4. the demo recipe trained on the raw (polluted) set, the filtered one, and the curated one (filtered,
   then deduplicated at the threshold with the best F1) for the same steps, 3 seeds: figures side by
   side on the held-out samples that did not leak.

    .venv/bin/python benchmarks/curation.py                  # ~20 min on 2 cores
    .venv/bin/python benchmarks/curation.py --mismatch 0.4 --steps 300 --seeds 0

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

from common import BIN, REPO, demo_figures, seed_row, table

FIGURES = {
    "image->text zero-shot": "eval/zero_shot/image->text/acc",
    "audio->text zero-shot": "eval/zero_shot/audio->text/acc",
    "image->text R@1": "eval/retrieval/image->text/R@1",
    "text->image R@10": "eval/retrieval/text->image/R@10",
}


def cli(*args: str) -> str:
    done = subprocess.run([str(BIN / "contrastive-data"), *args], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"contrastive-data {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def keys(directory: Path) -> set[str]:
    import tarfile

    out = set()
    for shard in directory.glob("*.tar"):
        with tarfile.open(shard) as tar:
            out |= {name.split(".", 1)[0] for name in tar.getnames()}
    return out


def train(data: Path, heldout: Path, run_dir: Path, steps: int, seed: int, *extra: str) -> dict[str, float]:
    return demo_figures(data, heldout, run_dir, steps, seed, FIGURES, *extra)


def precision_recall(found: set, planted: set) -> dict[str, float]:
    hit = len(found & planted)
    return {"precision": hit / max(1, len(found)), "recall": hit / max(1, len(planted)), "found": len(found)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mismatch", type=float, default=0.3)
    parser.add_argument("--scorer-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.99, 0.995, 0.997, 0.998, 0.999])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "curation")
    parser.add_argument("--reuse", action="store_true", help="keep the polluted set and scorer of an earlier run")
    args = parser.parse_args()
    out = args.out
    heldout = out / "clean" / "heldout"
    scorer = out / "scorer"
    reuse = args.reuse and (scorer / "export" / "config.json").exists()
    if not reuse:
        shutil.rmtree(out, ignore_errors=True)
        from contrastive.data_tools.demo import build_demo

        build_demo(out / "clean", copies=1)  # one sample per image: the only copies are the planted ones
        cli("pollute", str(out / "clean" / "train"), str(out / "polluted"), "--against", str(heldout),
            "--mismatch", str(args.mismatch), "--leaks", "30")  # fmt: skip
    for stale in ("filtered", "curated", "heldout-not-leaked"):
        shutil.rmtree(out / stale, ignore_errors=True)
    planted = json.loads((out / "polluted" / "planted.json").read_text())
    print(
        f"polluted set: {planted['samples']} samples; planted {len(planted['mismatched'])} swapped captions, "
        f"{len(planted['duplicates'])} copies, {len(planted['near_duplicates'])} near copies, "
        f"{len(planted['leaks'])} leaks of the held-out set",
        flush=True,
    )
    if not reuse:
        train(out / "polluted", heldout, scorer, args.scorer_steps, 100)
    cli("score", str(out / "polluted"), "--model", str(scorer / "export"), "--out", str(out / "scores"))
    keep = f"{1 - args.mismatch:.0%}"
    cli("filter", str(out / "polluted"), str(out / "filtered"), "--scores", str(out / "scores"),
        "--top", f"image-text:{keep}")  # fmt: skip
    dropped = keys(out / "polluted") - keys(out / "filtered")
    filtering = precision_recall(dropped, set(planted["mismatched"]))
    print(
        f"filter --top image-text:{keep}: dropped {len(dropped)}; precision {filtering['precision']:.1%}, "
        f"recall {filtering['recall']:.1%} against the swapped captions",
        flush=True,
    )
    copies = {frozenset(p) for kind in ("duplicates", "near_duplicates") for p in planted[kind].items()}
    dedup = {}
    for threshold in args.thresholds:
        report = out / f"dedup-{threshold}.json"
        cli("dedup", str(out / "polluted"), "--against", str(heldout), "--model", str(scorer / "export"),
            "--threshold", str(threshold), "--report", str(report))  # fmt: skip
        found = json.loads(report.read_text())
        pairs = {frozenset((f["key"], f["of"])) for f in found["duplicates"]}
        leaks = {(f["key"], f["of"]) for f in found["leaks"]}
        dedup[threshold] = {
            "copies": precision_recall(pairs, copies),
            "exact copies found": sum(frozenset(p) in pairs for p in planted["duplicates"].items()),
            "near copies found": sum(frozenset(p) in pairs for p in planted["near_duplicates"].items()),
            "leaks": precision_recall(leaks, set(planted["leaks"].items())),
        }
        d = dedup[threshold]
        print(
            f"dedup at {threshold}: copies found {d['exact copies found']}/{len(planted['duplicates'])} exact, "
            f"{d['near copies found']}/{len(planted['near_duplicates'])} near, {d['copies']['found']} pairs called "
            f"copies (precision {d['copies']['precision']:.1%}); leaks {d['leaks']['recall']:.0%} found, "
            f"{d['leaks']['found']} samples called leaks (precision {d['leaks']['precision']:.1%})",
            flush=True,
        )

    def f1(t: float) -> float:
        p, r = dedup[t]["copies"]["precision"], dedup[t]["copies"]["recall"]
        return 2 * p * r / max(p + r, 1e-9)

    chosen = max(args.thresholds, key=f1)  # the best balance of copies found and samples wrongly dropped
    cli("dedup", str(out / "filtered"), "--against", str(heldout), "--model", str(scorer / "export"),
        "--threshold", str(chosen), "--out", str(out / "curated"))  # fmt: skip
    curated = len(keys(out / "curated"))
    print(f"curated set (filtered, then deduplicated at {chosen}): {curated} samples", flush=True)
    # the raw set holds leaked held-out samples: every set is scored on the held-out samples that leaked
    # nowhere, so that no figure counts a memorised answer
    honest = out / "heldout-not-leaked"
    leaked = set(planted["leaks"].values())
    from contrastive.data_tools.curate import copy_kept

    honest.mkdir()
    sizes = {}
    for shard in sorted(heldout.glob("*.tar")):
        sizes[shard.name] = copy_kept(str(shard), honest / shard.name, lambda s: s["__key__"] not in leaked)["kept"]
    (honest / "sizes.json").write_text(json.dumps(sizes))
    print(f"scored on the {sum(sizes.values())} held-out samples that did not leak", flush=True)
    sets = {"raw (polluted)": out / "polluted", "filtered": out / "filtered", "curated": out / "curated"}
    recipes: dict[str, list] = {name: [] for name in sets}
    for seed in args.seeds:
        for name, data in sets.items():
            run = out / f"{name.split()[0]}-{seed}"
            recipes[name].append(train(data, honest, run, args.steps, seed, "export=false"))
        for name, found in recipes.items():
            seed_row(name, seed, found[-1])
    summary = table(recipes, FIGURES, "training set")
    print(
        json.dumps(
            {
                "planted": {k: len(v) for k, v in planted.items() if k != "samples"},
                "filter": filtering,
                "dedup": {str(k): v for k, v in dedup.items()},
                "curated_samples": curated,
                "runs": recipes,
                "summary": summary,
                "settings": vars(args) | {"out": str(args.out)},
            }
        )
    )


if __name__ == "__main__":
    main()
