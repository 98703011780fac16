#!/usr/bin/env bash
# The GPU check in one go, for a short lease (at most 9.5 minutes): installs the wheels prepare.sh
# gathered, runs the tests marked `cuda`, then measures against open_clip's own trainer on the same GPU
# (benchmarks/gpu/measure.py). Prints as it goes; writes OUT/gpu.json, OUT/profile.json, OUT/cuda-tests.log,
# OUT/check.log.
#
#   bash benchmarks/gpu/check.sh OUT             on the lent GPU machine (after prepare.sh here)
#   bash benchmarks/gpu/check.sh OUT --dry-run   here, on the CPU, tiny sizes (.ci/run runs this)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: check.sh OUT [--dry-run]}
mode=${2:-}
mkdir -p "$out"
exec > >(tee "$out/check.log") 2>&1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

if [ "$mode" = --dry-run ]; then
    PY=${PYTHON:-.venv/bin/python}
    site=$(mktemp -d /tmp/contrastive-openclip-site.XXXXXX)
    # open_clip_train reads shards with webdataset 0.2.86 and imports pandas (the GPU machine has
    # pandas; prepare.sh carries webdataset); here both from the package index, beside the venv's numpy
    "$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$site" webdataset==0.2.86 \
        pandas python-dateutil pytz tzdata 2> >(grep -v "^WARNING: Location" >&2)
    budget=240
else
    PY=python3
    echo "[check] installing $(ls .whl/*.whl | wc -l) wheels into /tmp/site ($(elapsed) s)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    site=/tmp/site-openclip
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .whl/openclip-train/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true
    budget=330
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import contrastive, deepspeed, open_clip, hydra, webdataset; import torch; print('[check] imports fine, torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1

echo "[check] tests marked cuda ($(elapsed) s)"
timeout 150 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_install.py 2>&1 | tee "$out/cuda-tests.log"
tests=${PIPESTATUS[0]}

echo "[check] the step, phase by phase, against a bare open_clip-style loop ($(elapsed) s)"
timeout 150 "$PY" benchmarks/gpu/step_profile.py --out "$out/profile.json" ${mode:+$mode}
profiled=$?

echo "[check] measurements ($(elapsed) s)"
timeout $((budget + 60)) "$PY" benchmarks/gpu/measure.py --out "$out/gpu.json" --open-clip-site "$site" \
    --budget "$budget" ${mode:+$mode}
measured=$?
echo "[check] done in $(elapsed) s: tests exit $tests, step profile exit $profiled, measurements exit $measured; $out/gpu.json"
[ "$tests" = 0 ] && [ "$profiled" = 0 ] && [ "$measured" = 0 ]
