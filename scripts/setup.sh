#!/usr/bin/env bash
# Create and fill .venv on first use (idempotent): the exact torch/torchvision pair this
# project is tested with, then raycv itself with its dev extra. Re-runs only when
# pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
PYTHON="${PYTHON:-python3}"
stamp=.venv/.raycv-setup
want="$(cat pyproject.toml "$0" | sha256sum | cut -d' ' -f1)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/raycv ]; then
  exit 0
fi
echo "setting up .venv (first run takes a few minutes) ..." >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q $TORCH_PINS
.venv/bin/python -m pip install -q -e ".[dev]"
echo "$want" > "$stamp"
echo "setup done: .venv is ready" >&2
