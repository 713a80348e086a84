#!/usr/bin/env bash
# The main job: set up .venv if needed, then train on the built-in shapes dataset.
# Extra arguments go to `raycv train` (e.g. train.epochs=3 or --local).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/raycv train configs/quickstart.yaml "$@"
