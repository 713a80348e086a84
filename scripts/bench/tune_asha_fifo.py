"""ASHA against FIFO on the same search space: trial-epochs spent and best val accuracy.

Both sweeps draw the same configurations (random search with one seed, so the comparison
is about stopping, not about what was sampled) over batch size, learning rate and pruning
ratio, on the built-in shapes, in one Ray session, one after the other. ASHA stops trials
at rungs of 1, 3 and 9 epochs (reduction factor 3); FIFO trains every trial to the full
budget.

The default is the ``easy`` setting: on a 2-core CPU, FIFO's 16 full trials afford about
15k samples each, and ResNet-18 from scratch stays at chance on ``medium`` and ``hard``
with that many (measured: val accuracy 0.25 with 4 classes after 6 epochs of 2,400
images), so a comparison there would rank noise. Pass ``--difficulty hard`` with more
images on a machine that can afford it.

Goal: ASHA's best within 1 point of FIFO's best, with at most a third of its trial-epochs.

Run by hand, not in CI (about 25 minutes on 2 cores):

    python scripts/bench/tune_asha_fifo.py
    python scripts/bench/tune_asha_fifo.py --samples 8 --epochs 3 --num-images 800   # a quick look
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import results

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[2]
POINTS, SHARE = 0.01, 1 / 3  # the goal: within 1 point, at most a third of the epochs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = results.parser(__file__, __doc__, "the full results (every trial, the machine)")
    p.add_argument("--samples", type=int, default=16, help="trials per sweep (default 16)")
    p.add_argument("--epochs", type=int, default=9, help="full budget per trial (default 9)")
    p.add_argument(
        "--num-images", type=int, default=2400, help="shapes images, train + val (default 2400)"
    )
    p.add_argument(
        "--difficulty", default="easy", help="shapes difficulty: easy (default), medium, hard"
    )
    p.add_argument("--seed", type=int, default=0, help="search seed shared by both sweeps")
    p.add_argument(
        "--reduction-factor",
        type=float,
        default=3.0,
        help="ASHA keeps 1/factor of the trials at each rung (default 3: rungs at 1, 3, 9)",
    )
    p.add_argument("--storage", type=Path, default=None, help="sweep folders (default: a temp dir)")
    return p.parse_args(argv)


def sweep_config(args: argparse.Namespace, storage: Path, scheduler: str):
    from raycv.config import load_config

    return load_config(
        REPO / "configs" / "sweep.yaml",
        [
            f"experiment=bench-{scheduler}",
            f"run.storage={storage}",
            f"data.shapes.num_images={args.num_images}",
            f"data.shapes.difficulty={args.difficulty}",
            f"train.epochs={args.epochs}",
            f"tune.num_samples={args.samples}",
            "tune.searcher=random",  # the same draws for both: seeded, blind to results
            f"tune.seed={args.seed}",
            f"tune.scheduler.name={scheduler}",
            "tune.scheduler.grace_period=1",
            f"tune.scheduler.reduction_factor={args.reduction_factor}",
            "tune.max_retries=0",
        ],
    )


def run_one(args: argparse.Namespace, storage: Path, scheduler: str) -> dict[str, Any]:
    from raycv.sweep.run import run_tune

    started = time.perf_counter()
    run = run_tune(sweep_config(args, storage, scheduler))
    wall = time.perf_counter() - started
    trials = pd.read_csv(run.path / "trials.csv")
    return {
        "scheduler": scheduler,
        "sweep_folder": str(run.path),
        "trials": len(trials),
        "trial_epochs": int(trials.epochs.sum()),
        "best_val_acc": float(trials.val_acc.max()),
        "stopped_early": int((trials.status == "stopped early").sum()),
        "failed": int((trials.status == "failed").sum()),
        "worker_cpu_s": float(trials.worker_cpu_s.sum()),
        "wall_s": round(wall, 1),
        "per_trial": trials.to_dict(orient="records"),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results.setup_logging()
    info = results.machine()
    storage = args.storage or Path(tempfile.mkdtemp(prefix="bench-tune-"))
    runs = {name: run_one(args, storage, name) for name in ("asha", "fifo")}
    asha, fifo = runs["asha"], runs["fifo"]
    share = asha["trial_epochs"] / fifo["trial_epochs"]
    gap = fifo["best_val_acc"] - asha["best_val_acc"]
    verdict = {
        "epochs_share": round(share, 3),
        "accuracy_gap_points": round(100 * gap, 2),
        "goal_met": share <= SHARE and gap <= POINTS,
    }
    columns = ["scheduler", "trials", "stopped early", "trial-epochs", "best val acc", "wall s"]
    rows = [
        [r["scheduler"], r["trials"], r["stopped_early"], r["trial_epochs"], r["best_val_acc"],
         r["wall_s"]]
        for r in runs.values()
    ]  # fmt: skip
    print(results.header("ASHA vs FIFO, same search space", info))
    print(
        f"{args.samples} samples, {args.epochs} epochs budget, shapes {args.difficulty} "
        f"({args.num_images} images), ASHA reduction factor {args.reduction_factor:g}"
    )
    print(results.table(columns, rows))
    print(
        f"ASHA spent {share:.0%} of FIFO's trial-epochs; its best is {100 * -gap:+.1f} points "
        f"against FIFO's (goal: <= {SHARE:.0%} of the epochs, no worse than -1 point): "
        f"{'met' if verdict['goal_met'] else 'NOT met'}"
    )
    results.write(
        args.out, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                   "runs": runs, "verdict": verdict}
    )  # fmt: skip


if __name__ == "__main__":
    main()
