"""How a pruned model's recovery spends its epochs: one fine-tuned model, several recipes.

The main job's compress stage prunes the fine-tuned model's channels by a quarter and then
fine-tunes it again (the recovery), distilled from the model it pruned. This script takes
one fine-tuned model (``--finetuned``, a run folder; or, without it, ``raycv pipeline
CONFIG --until finetune`` first) and runs ``raycv compress`` on it once per recipe, each as
a subprocess in a fresh Ray, then reads each run's compression table: the score of the
pruned model before and after its recovery against the original's.

Recipes (``RECIPES``): the recovery epochs, distillation on and off, the distillation
weight, and pruning in two steps. Latency is not what this compares (3 eager repeats).

Run by hand, not in CI (about 2-3 minutes per recipe on 2 cores):

    python scripts/bench/compress_recovery.py
    python scripts/bench/compress_recovery.py --finetuned RUNS/quickstart/pipeline-X/finetune
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import results

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[2]
PRUNE = "channel:0.25"
RECIPES: dict[str, list[str]] = {
    "10 epochs, distilled": ["compress.epochs=10"],
    "40 epochs, distilled": ["compress.epochs=40"],
    "60 epochs, distilled": ["compress.epochs=60"],
    "40 epochs, soft targets only": ["compress.epochs=40", "distill.weight=1.0"],
    "40 epochs, labels only": ["compress.epochs=40", "compress.distill=false"],
    "2 steps of 20 epochs, distilled": ["compress.epochs=20", "compress.steps=2"],
}
QUICK = ["compress.quantize=null", "compress.latency.repeats=3", "compress.latency.runtime=eager"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = results.parser(__file__, __doc__, "each recipe's compression table")
    p.add_argument("--finetuned", help="a fine-tuned run folder (default: make one)")
    p.add_argument(
        "--config", default=str(REPO / "configs" / "quickstart.yaml"), help="pipeline config"
    )
    return p.parse_args(argv)


def _raycv(args: list[str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "raycv", *args], cwd=REPO, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"raycv {args[0]} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def finetuned(config: str, storage: Path) -> Path:
    out = _raycv(["pipeline", config, "--until", "finetune", f"run.storage={storage}"])
    folder = next(Path(x) for x in reversed(out.splitlines()) if Path(x).is_dir())
    return folder / "finetune"


def recover(model: Path, overrides: list[str], storage: Path) -> dict[str, Any]:
    started = time.perf_counter()
    _raycv(["compress", str(model), "--prune", PRUNE, f"run.storage={storage}", *QUICK, *overrides])
    table = next(storage.glob("*/compress-*/compression.json"))
    rows = json.loads(table.read_text())
    original, pruned = rows[0], [r for r in rows if r["method"] == "prune"]
    return {
        "original": original["score"],
        "one_shot": pruned[0]["score"],
        "recovered": pruned[-1]["score"],
        "drop_pts": 100 * (original["score"] - pruned[-1]["score"]),
        "seconds": time.perf_counter() - started,
    }


def report(runs: dict[str, dict[str, Any]], model: str, info: dict[str, Any]) -> str:
    rows = [
        [name, r["original"], r["one_shot"], r["recovered"], r["drop_pts"], r["seconds"]]
        for name, r in runs.items()
    ]
    columns = ["recipe", "fine-tuned", "pruned", "recovered", "drop (pts)", "s"]
    title = f"raycv compress {model} --prune {PRUNE}"
    return "\n\n".join([results.header(title, info), results.table(columns, rows)])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results.setup_logging()
    info = results.machine()
    with tempfile.TemporaryDirectory(prefix="raycv-bench-") as tmp:
        model = Path(args.finetuned) if args.finetuned else finetuned(args.config, Path(tmp))
        runs = {}
        for i, (name, overrides) in enumerate(RECIPES.items()):
            log.info("%s: %s", name, " ".join(overrides))
            runs[name] = recover(model, overrides, Path(tmp) / f"recipe-{i}")
    print(report(runs, str(model), info))
    results.write(args.out, {"machine": info, "model": str(model), "recipes": runs})


if __name__ == "__main__":
    main()
