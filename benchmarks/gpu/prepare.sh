#!/usr/bin/env bash
# Gathers into .whl/ (ignored by git) the wheels that the lent GPU machine lacks, pinned, for its
# Python 3.12 on x86-64, and prints the command to run there and the paths to carry (64 MiB at most).
# The machine has torch 2.11 + CUDA 13, timm, transformers, peft, safetensors, numpy, pandas, pytest
# (see the device tool's KINDS.md); what `import contrastive`, DeepSpeed, open_clip and open_clip's
# trainer need beyond that travels here. Runs on a machine like this one (it needs the package index).
#
#   bash benchmarks/gpu/prepare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
out=.whl
rm -rf "$out"
mkdir -p "$out/openclip-train"
pip_() { "$PY" -m pip --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }
download() {  # binary wheels for the machine's CPython 3.12 on x86-64 manylinux
    pip_ download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 "$@"
}

download -d "$out" open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 \
    hydra-core==1.3.8 omegaconf==2.3.1 webdataset==1.0.2 braceexpand==0.1.7 \
    soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 \
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# open_clip's trainer reads its shards with webdataset 0.2.86 (its own folder, beside ours)
download -d "$out/openclip-train" webdataset==0.2.86
# The package index has only the source of these two: built here into pure-Python wheels. DeepSpeed
# without its compiled ops (DS_BUILD_OPS=0): it needs none of them for what the check runs.
pip_ wheel -q --no-deps -w "$out" antlr4-python3-runtime==4.9.3
DS_BUILD_OPS=0 pip_ wheel -q --no-deps --no-build-isolation -w "$out" deepspeed==0.19.8

size=$(du -sm "$out" | cut -f1)
echo "wheels in $out: $(find "$out" -type f -name '*.whl' | wc -l) files, ${size} MiB (the carried limit is 64 MiB)"
find "$out" -type f -name '*.whl' -printf '  %P\n' | sort
[ "$size" -lt 64 ] || { echo "too large to carry" >&2; exit 1; }
cat <<MSG

On the GPU machine (device tool, run): carry [".whl"], timeout_s 590, command:
  bash benchmarks/gpu/check.sh \$OUT
It installs the wheels into /tmp/site, runs the cuda tests, measures, and leaves \$OUT/gpu.json, \$OUT/profile.json,
\$OUT/cuda-tests.log and \$OUT/check.log.
MSG
