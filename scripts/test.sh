#!/usr/bin/env bash
# The test suite, from a fresh clone: install, then run pytest (extra arguments go to pytest).
#
#   bash scripts/test.sh
#   bash scripts/test.sh -k loss -x
#   bash scripts/test.sh -n 0 -s tests/test_e2e.py     # one process, output shown (for a debugger)
#
# Two pytest workers (pytest-xdist), each running whole files (its module fixtures built once): the
# suite alone keeps a 2-core machine ~60% idle (one-thread ranks, servers, waits), two workers ~7%.
# TEST_WORKERS=N for another count.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh
# Lint and format, as configured in pyproject.toml ([tool.ruff]): fix with `.venv/bin/ruff format .`
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# The SLURM tests start a real single-node cluster; its Debian packages come from here.
bash slurm/local_cluster.sh install || echo "[test] SLURM could not be installed: its tests will say so and skip"
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
