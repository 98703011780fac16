#!/usr/bin/env bash
# The GPU check, for a short lease: installs the wheels prepare.sh gathered, then runs the parts asked
# for (all of them by default), each printing as it goes:
#   tests      the tests marked `cuda` (tests/test_cuda.py, tests/test_install.py)          ~2.5 min
#   multirank  two ranks on the one GPU under a group that refuses host tensors (cuda:gloo), and one
#              NCCL rank with every collective forced: train, evaluate, SIGTERM, resume   ~2 min
#   profile    the step row by row against open_clip's step, no loader (step_profile.py)  ~3 min
#   measure    contrastive-train against open_clip's trainer end to end (measure.py)       ~6 min
# Writes OUT/cuda-tests.log, OUT/multirank.json, OUT/profile.json, OUT/gpu.json and OUT/check.log.
#
#   bash benchmarks/gpu/check.sh OUT tests multirank profile   first run on the lent GPU (~8 min)
#   bash benchmarks/gpu/check.sh OUT measure                   second run (~6 min)
#   bash benchmarks/gpu/check.sh OUT --dry-run                 here, on the CPU, tiny sizes (.ci/run)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: check.sh OUT [--dry-run] [tests] [multirank] [profile] [measure]}
shift
mode=
parts=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) mode=--dry-run ;;
        tests|multirank|profile|measure) parts+=("$arg") ;;
        *) echo "check.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done
[ ${#parts[@]} -gt 0 ] || parts=(tests multirank profile measure)
wants() { [[ " ${parts[*]} " == *" $1 "* ]]; }
mkdir -p "$out"
exec > >(tee -a "$out/check.log") 2>&1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

if [ "$mode" = --dry-run ]; then
    PY=${PYTHON:-.venv/bin/python}
    site=$(mktemp -d /tmp/contrastive-openclip-site.XXXXXX)
    # open_clip_train reads shards with webdataset 0.2.86 and imports pandas (the GPU machine has
    # pandas; prepare.sh carries webdataset); here both from the package index, beside the venv's numpy
    if wants measure; then
        "$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$site" webdataset==0.2.86 \
            pandas python-dateutil pytz tzdata 2> >(grep -v "^WARNING: Location" >&2)
    fi
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

failed=()
if wants tests; then
    echo "[check] tests marked cuda ($(elapsed) s)"
    timeout 150 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_install.py 2>&1 | tee "$out/cuda-tests.log"
    [ "${PIPESTATUS[0]}" = 0 ] || failed+=(tests)
fi
if wants multirank; then
    echo "[check] the multi-rank path on one device ($(elapsed) s)"
    timeout 280 "$PY" benchmarks/gpu/multirank.py --out "$out/multirank.json" --timeout 120 ${mode:+$mode} || failed+=(multirank)
fi
if wants profile; then
    echo "[check] the step, row by row, against open_clip's step ($(elapsed) s)"
    timeout 240 "$PY" benchmarks/gpu/step_profile.py --out "$out/profile.json" ${mode:+$mode} || failed+=(profile)
fi
if wants measure; then
    echo "[check] measurements ($(elapsed) s)"
    timeout $((budget + 60)) "$PY" benchmarks/gpu/measure.py --out "$out/gpu.json" --open-clip-site "$site" \
        --budget "$budget" ${mode:+$mode} || failed+=(measure)
fi
echo "[check] done in $(elapsed) s: ${parts[*]}; failed: ${failed[*]:-none}"
[ ${#failed[@]} = 0 ]
