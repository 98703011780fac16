#!/usr/bin/env bash
# The test suite, from a fresh clone: install, then run pytest (extra arguments go to pytest).
#
#   bash scripts/test.sh
#   bash scripts/test.sh -k loss -x
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh
exec .venv/bin/python -m pytest "$@"
