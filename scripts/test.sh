#!/usr/bin/env bash
# The whole test suite (what CI runs): set up .venv if needed, lint, then pytest.
# Extra arguments go to pytest (e.g. -m "not slow" or -k config).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Starting Ray Train workers on 2 cores can take tens of seconds: wait rather than fail.
export RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="${RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S:-300}"
exec .venv/bin/python -m pytest "$@"
