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
# Two pytest processes, each taking whole test modules (a module shares one local Ray): most
# of the suite waits on Ray's process start-up, so two at a time fit 2 cores. RAYCV_TEST_PROCS=0
# runs everything in this one process.
procs="${RAYCV_TEST_PROCS:-2}"
parallel=()
[ "$procs" = 0 ] || parallel=(-n "$procs" --dist loadfile)
exec .venv/bin/python -m pytest "${parallel[@]}" "$@"
