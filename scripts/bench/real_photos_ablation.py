"""Why raycv beats the seed recipe on real photos: configs/folder.yaml with one change at a time.

Each arm is ``raycv train configs/folder.yaml`` on the same ImageFolder (by default the 6-class
clothing photos in ``../shared/data/clothing6``), from scratch, for the same number of epochs,
with one group of overrides that undoes one of the recipe's choices:

* ``folder.yaml``: as shipped (whole photos cached, AdamW 1e-3 with weight decay 0.05, a
  one-epoch warm-up and cosine decay, label smoothing 0.1).
* ``centre-crop cache``: ``data.folder.train_images=centre_crop``: every training photo is
  centre-cropped to a square once, so the random resized crop never sees its sides (raycv
  before whole photos were cached).
* ``seed optimiser``: the seed recipe's optimisation: Adam 1e-3 at a constant rate (a step
  schedule that never steps), no weight decay, no warm-up, no label smoothing.

Arms run one after the other, every arm once per seed (``seed=K``: initialisation, order and
augmentation draws), and the table gives each arm's best and last validation accuracy, the mean
over seeds and the range. Accuracy after a fixed number of epochs does not depend on how busy
the machine is, only wall-clock does (that comparison is ``real_photos.py``). Run by hand:

    python scripts/bench/real_photos_ablation.py                      # 3 arms x 2 seeds x 15 epochs
    python scripts/bench/real_photos_ablation.py --seeds 0 1 2 --image-size 64
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import results
from real_photos import REPO
from train_throughput import START_TIMEOUT

log = results.log
ARMS = {
    "folder.yaml": [],
    "centre-crop cache": ["data.folder.train_images=centre_crop"],
    "seed optimiser": [
        "optimizer.name=adam",
        "optimizer.lr=1e-3",
        "optimizer.weight_decay=0",
        "scheduler.name=step",
        "scheduler.step_size=100000",
        "scheduler.warmup_epochs=0",
        "train.label_smoothing=0",
    ],
}


def parse_args(argv: list[str] | None = None):
    p = results.parser(__file__, __doc__, "every run's epochs and the arms' summaries")
    results.add_photo_folder(p)
    p.add_argument("--image-size", type=int, default=112, help="model.image_size (default 112)")
    p.add_argument("--batch-size", type=int, default=32, help="train.batch_size (default 32)")
    p.add_argument("--epochs", type=int, default=15, help="train.epochs of every run (15)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (default 0 1)")
    p.add_argument(
        "--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="arms to run (all)"
    )
    args = p.parse_args(argv)
    results.check_photo_folder(args)
    return args


def train(args, overrides: list[str], seed: int, storage: Path) -> dict[str, Any]:
    """One ``raycv train`` run to the end; its per-epoch metrics and its wall time."""
    from raycv.runs import read_metrics

    script = Path(sys.executable).with_name("raycv")
    head = [str(script)] if script.is_file() else [sys.executable, "-m", "raycv"]
    cmd = [
        *head,
        "train",
        str(REPO / "configs" / "folder.yaml"),
        f"data.folder.root={args.root}",
        f"data.folder.val_split={args.val_split}",
        f"model.image_size={args.image_size}",
        f"train.batch_size={args.batch_size}",
        f"train.epochs={args.epochs}",
        f"seed={seed}",
        "experiment=bench-ablation",
        f"run.storage={storage}",
        *overrides,
    ]
    env = {**os.environ, **{k: v for k, v in START_TIMEOUT.items() if k not in os.environ}}
    started = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    (metrics,) = storage.glob("bench-ablation/*/metrics.jsonl")  # a fresh storage per run
    epochs = read_metrics(metrics)
    return {
        "command": cmd,
        "seconds": time.time() - started,
        "val_acc": [e["val_acc"] for e in epochs],
        "train_acc": [e.get("train_acc") for e in epochs],
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = [max(r["val_acc"]) for r in runs]
    last = [r["val_acc"][-1] for r in runs]
    return {
        "best_mean": sum(best) / len(best),
        "best_range": [min(best), max(best)],
        "last_mean": sum(last) / len(last),
        "seconds_mean": sum(r["seconds"] for r in runs) / len(runs),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results.setup_logging()
    info = results.machine()
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in args.arms}
    for seed in args.seeds:
        for arm in args.arms:
            log.info("%s, seed %d: %d epochs ...", arm, seed, args.epochs)
            with tempfile.TemporaryDirectory(prefix="raycv-ablation-") as tmp:
                runs[arm].append(train(args, ARMS[arm], seed, Path(tmp)))
            log.info("  best val acc %.3f", max(runs[arm][-1]["val_acc"]))
    summaries = {arm: summary(r) for arm, r in runs.items()}
    rows = [
        (
            arm,
            len(runs[arm]),
            f"{s['best_mean']:.3f}",
            "{:.3f}-{:.3f}".format(*s["best_range"]),
            f"{s['last_mean']:.3f}",
            s["seconds_mean"],
        )
        for arm, s in summaries.items()
    ]
    columns = ["arm", "seeds", "best val acc", "best range", "last val acc", "s per run"]
    print(results.header("configs/folder.yaml on real photos, one change at a time", info))
    print()
    print(results.table(columns, rows))
    print(
        f"\nS={args.image_size}, batch {args.batch_size}, {args.epochs} epochs, seeds "
        f"{args.seeds}; {args.root.name}: train/ vs {args.val_split}/"
    )
    data = {
        "benchmark": "real_photos_ablation",
        "machine": info,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "arms": {arm: {"overrides": ARMS[arm], **summaries[arm]} for arm in runs},
        "runs": runs,
    }
    results.write(args.out, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
