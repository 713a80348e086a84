#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the whole pipeline on the built-in shapes
# (pretrain -> sweep -> fine-tune vs scratch -> compress -> export -> report).
# Extra arguments go to `raycv pipeline` (e.g. --resume, or tune.num_samples=2).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/raycv pipeline configs/quickstart.yaml "$@"
