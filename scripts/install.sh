#!/usr/bin/env bash
# Installs contrastive into ./.venv with everything it needs, in one pip resolver run.
#
#   bash scripts/install.sh
#   VENV=/opt/venv PACKAGE=dist/contrastive-0.1.0-py3-none-any.whl bash scripts/install.sh   # a wheel
#
# CPU machine (no nvidia-smi): the CPU build of torch 2.13.0 and no nvidia-* package.
# CUDA machine: the CUDA build of the same torch release from the package index.
# Re-running is cheap: a stamp file skips pip when nothing the install depends on changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PACKAGE=${PACKAGE:--e .[test]}  # what to install: this checkout, editable, with the test tools; or a wheel
TORCH_PINS=(torch==2.13.0 torchvision==0.28.0 torchaudio==2.11.0)

# pip warns once per package about the machine's optional local indexes; keep the log readable.
quiet_pip_warnings() { grep -v "^WARNING: Location 'file://" >&2 || true; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages: espeak-ng speaks the words of the demo and emoji data sets; the emoji set draws
# Noto Color Emoji and names them from CLDR's annotations. No FFmpeg: audio is decoded by soundfile
# (its wheel bundles libsndfile: WAV, FLAC, OGG, MP3), never by torchaudio.load, so torchcodec and
# FFmpeg's libraries are not needed.
apt_missing=()
command -v espeak-ng >/dev/null 2>&1 || apt_missing+=(espeak-ng)
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || apt_missing+=(fonts-noto-color-emoji)
[ -f /usr/share/unicode/cldr/common/annotations/en.xml ] || apt_missing+=(unicode-cldr-core)
# with the test tools: a real headless browser and its WebDriver for the search page's test
if [[ "$PACKAGE" == *"[test]"* ]]; then
    command -v chromium >/dev/null 2>&1 || apt_missing+=(chromium)
    command -v chromedriver >/dev/null 2>&1 || apt_missing+=(chromium-driver)
fi
if [ ${#apt_missing[@]} -gt 0 ]; then
    echo "[install] apt: ${apt_missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    DEVICE=cuda
else
    DEVICE=cpu
fi

stamp=$VENV/.contrastive-install
want="$DEVICE $PACKAGE $(cat pyproject.toml scripts/install.sh scripts/torchvision_cpu_shim.py | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "[install] $VENV is up to date ($DEVICE)"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY=$VENV/bin/python
PIP=("$PY" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip 2> >(quiet_pip_warnings)
# One resolver run: torch is pinned in the same command as everything that depends on it, so no
# dependency can ask for another torch (on a CPU machine that would be a multi-GB CUDA build).
echo "[install] pip: ${TORCH_PINS[*]} + $PACKAGE ($DEVICE)"
# shellcheck disable=SC2086  # PACKAGE is "-e .[test]" or a wheel's path: split on purpose
# (setuptools' build backend warns about every editable install with a banner; not ours to act on)
PYTHONWARNINGS="ignore:Editable installation" "${PIP[@]}" install -q "${TORCH_PINS[@]}" $PACKAGE \
    2> >(quiet_pip_warnings)

# The tests compare our evaluation with CLIP_benchmark's own. Its requirements name the captioning
# metrics' packages (pycocoevalcap, 100 MB, and transformers), which its zero-shot and retrieval
# code never imports: it is installed without them.
if [[ "$PACKAGE" == *"[test]"* ]]; then
    "${PIP[@]}" install -q --no-deps clip-benchmark==1.6.2 2> >(quiet_pip_warnings)
fi

SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# torchaudio's wheel ships compiled libraries built against a CUDA torch of its own release; beside
# the CPU torch they fail to load and make `import torchaudio` fail. The parts we use (MelSpectrogram,
# resample, fbank) are pure Python, so where the libraries cannot load we set them aside.
if ! "$PY" -c "import torchaudio" >/dev/null 2>&1; then
    echo "[install] torchaudio's compiled libraries do not load here: using its pure-Python parts"
    for so in "$SITE"/torchaudio/lib/*.so; do mv "$so" "$so.disabled"; done
    "$PY" -c "import torchaudio"
fi

# torchvision 0.28.0 (the release that pins torch 2.13.0) is a CUDA build: beside the CPU torch its
# operator library cannot load, and its import fails on `torchvision::nms`. The shim declares the two
# missing operator schemas the first time torchvision is imported (so open_clip imports, and its
# transforms work); it is installed only when the plain import fails.
rm -f "$SITE/contrastive_torchvision_shim.pth" "$SITE/_contrastive_torchvision_shim.py"
if ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
    echo "[install] torchvision's operator library does not load here: installing the CPU shim"
    cp scripts/torchvision_cpu_shim.py "$SITE/_contrastive_torchvision_shim.py"
    echo "import _contrastive_torchvision_shim" >"$SITE/contrastive_torchvision_shim.pth"
    "$PY" -c "import torchvision, open_clip"
fi

if [ "$DEVICE" = cpu ]; then
    torch_version=$("$PY" -c 'import torch; print(torch.__version__)')
    case "$torch_version" in *+cpu) ;; *) echo "[install] expected a CPU torch, got $torch_version" >&2; exit 1 ;; esac
    if "${PIP[@]}" list 2>/dev/null | grep -i '^nvidia-'; then
        echo "[install] nvidia-* packages were installed on a CPU machine" >&2
        exit 1
    fi
fi

echo "$want" >"$stamp"
echo "[install] done: $("$PY" -c 'import torch; print("torch", torch.__version__)')"
