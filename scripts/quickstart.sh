#!/usr/bin/env bash
# The main job, from a fresh clone: install, build the demo data, train a tiny image/audio/text model
# on CPU for a few minutes, evaluate it on the held-out split and export it.
#
#   bash scripts/quickstart.sh                       # extra arguments go to contrastive-train
#   bash scripts/quickstart.sh trainer.max_steps=1000
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh
[ -f data/demo/heldout/sizes.json ] || .venv/bin/contrastive-data demo data/demo

run=runs/demo-$(date +%Y%m%d-%H%M%S)
.venv/bin/contrastive-train experiment=demo hydra.run.dir="$run" "$@"
ln -sfn "$(basename "$run")" runs/demo  # the README's examples read the latest run as runs/demo
echo
echo "== the exported model, loaded again and evaluated on the held-out split =="
.venv/bin/contrastive-eval "$run/export" --data data/demo/heldout --json "$run/eval.json"
echo
echo "run directory: $run, also runs/demo  (config.yaml, metrics.jsonl, checkpoints/, export/, eval.json)"
