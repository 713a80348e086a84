"""A quickstart pipeline, timed: ``raycv pipeline configs/seg_quickstart.yaml`` (or
``--config configs/det_quickstart.yaml --metric val_map50 --goal 0.80 --within-s 600``).

Runs the pipeline as a subprocess (the command the README gives, in a fresh Ray, with
``seed`` and ``data.split_seed`` set to 0, 1, ... per ``--repeats``), then reads the
pipeline's manifests and its first training stage's ``metrics.jsonl``: the wall time of the
whole command and of each stage; the first training stage's best ``--metric`` (val mIoU) and
when it first reached ``--goal``, in seconds from the command's launch (``trained by``: that epoch's
``epoch_started_at`` + ``epoch_s``, the end of its training steps; ``scored by``: the next
epoch's start, or the metrics file's last write for the last epoch, so its validation is done
by then); and, when the pipeline got that far, fine-tuning against scratch and the compressed
model (best metric, MACs). ``--until pretrain`` runs the first training stage alone.

Goals: segmentation's first training stage reaches 0.90 val mIoU within 5 minutes of the
command's start on a 2-core CPU machine; detection's (yolo on shapes, easy) 0.80 val mAP@.5
within 10 minutes. A stage that fails is reported with its error, and the stages before
it still count.

Run by hand, not in CI (about 10 minutes per repeat on 2 cores; 5 with --until pretrain):

    python scripts/bench/seg_quickstart.py
    python scripts/bench/seg_quickstart.py --until pretrain --repeats 3
    python scripts/bench/seg_quickstart.py --config configs/det_quickstart.yaml \
        --metric val_map50 --goal 0.80 --within-s 600
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import results

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[2]
STAGES = ("pretrain", "tune", "finetune", "scratch", "compress", "export", "report")
TRAINED = ("pretrain", "finetune", "scratch", "compress")  # stages with a metric


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = results.parser(__file__, __doc__, "the full results")
    p.add_argument("--repeats", type=int, default=1, help="pipeline runs, seeds 0.. (default 1)")
    p.add_argument(
        "--config",
        default=str(REPO / "configs" / "seg_quickstart.yaml"),
        help="pipeline config (default: configs/seg_quickstart.yaml)",
    )
    p.add_argument(
        "--metric", default="val_miou", help="the validation metric timed (default val_miou)"
    )
    p.add_argument(
        "--goal", type=float, default=0.90, help="the value the first stage must reach (0.90)"
    )
    p.add_argument(
        "--within-s",
        type=float,
        default=300,
        help="seconds from the command's start to reach --goal in (default 300)",
    )
    p.add_argument(
        "--until",
        choices=STAGES,
        help="stop after this stage (raycv pipeline --until); pretrain: the training run alone",
    )
    p.add_argument(
        "--storage",
        type=Path,
        help="keep the pipeline folders here (default: a temporary folder, removed after)",
    )
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1 (got {args.repeats})")
    return args


def run_once(args: argparse.Namespace, seed: int, storage: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "raycv", "pipeline", args.config]
    cmd += [f"run.storage={storage}", f"seed={seed}", f"data.split_seed={seed}"]
    cmd += ["--until", args.until] if args.until else []
    log.info("seed %d: %s", seed, " ".join(cmd[2:]))
    launched = time.time()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.time() - launched
    # A fresh storage per run: its one pipeline folder, found even when the command failed.
    found = sorted(storage.glob("*/pipeline-*/manifest.json"))
    error = None
    if done.returncode != 0:
        error = "\n".join(done.stderr.strip().splitlines()[-15:])
        log.error("seed %d: the pipeline failed (exit %d):\n%s", seed, done.returncode, error)
    out = {"seed": seed, "wall_s": wall, "returncode": done.returncode, "error": error}
    if not found:
        return out
    folder = found[-1].parent
    return out | {"folder": str(folder), **_read(folder, launched, args)}


def _read(folder: Path, launched: float, args: argparse.Namespace) -> dict[str, Any]:
    manifest = json.loads((folder / "manifest.json").read_text())
    stages = manifest.get("stages", {})
    out: dict[str, Any] = {
        "status": manifest.get("status"),
        "stage_s": {name: stages.get(name, {}).get("elapsed_s") for name in STAGES},
        "stage_status": {name: stages[name].get("status") for name in STAGES if name in stages},
        "scores": {},
    }
    for stage in TRAINED:
        path = folder / stage / "manifest.json"
        stage_manifest = json.loads(path.read_text()) if path.is_file() else {}
        metrics = stage_manifest.get("metrics") or {}
        best, final = metrics.get("best") or {}, metrics.get("final") or {}
        if args.metric in best:
            out["scores"][stage] = {
                "best": best[args.metric],
                "best_epoch": best.get("epoch"),
                "final": final.get(args.metric),
                "epochs": final.get("epoch"),
                "params": best.get("params"),
                "macs": best.get("macs"),
            }
    first = next((s for s in TRAINED if (folder / s / "metrics.jsonl").is_file()), None)
    if first is not None:
        timed = _time_to_goal(folder / first, launched, args.metric, args.goal)
        out["first_stage"] = {"stage": first, **timed}
    return out


def _time_to_goal(run: Path, launched: float, metric: str, goal: float) -> dict[str, Any]:
    """Every epoch of a training stage against the command's launch, and the first whose
    ``metric`` reached ``goal``."""
    from raycv.runs import read_metrics

    rows = read_metrics(run / "metrics.jsonl")
    written = (run / "metrics.jsonl").stat().st_mtime
    epochs = []
    for row, after in zip(rows, [*rows[1:], None]):
        scored = after["epoch_started_at"] if after else written
        epochs.append(
            {
                "epoch": row["epoch"],
                "score": row.get(metric),
                "trained_by_s": row["epoch_started_at"] + row["epoch_s"] - launched,
                "scored_by_s": scored - launched,
                "epoch_s": row["epoch_s"],
                "images_per_s": row.get("images_per_s"),
            }
        )
    reached = next((e for e in epochs if (e["score"] or 0) >= goal), None)
    best = max(epochs, key=lambda e: e["score"] or 0, default=None)
    return {
        "epoch1_started_s": rows[0]["epoch_started_at"] - launched if rows else None,
        "best": best,
        "reached": reached,
        "epochs": epochs,
    }


def report(runs: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace) -> str:
    parts = [results.header(f"raycv pipeline {Path(args.config).name}", info)]
    seeds = [f"seed {r['seed']} (s)" for r in runs]
    stage_rows = [
        [name, *(_stage_cell(r, name) for r in runs)]
        for name in STAGES
        if any(r.get("stage_status", {}).get(name) for r in runs)
    ]
    stage_rows.append(["whole command", *(r["wall_s"] for r in runs)])
    parts.append(results.table(["stage", *seeds], stage_rows))
    first_rows = []
    for r in runs:
        first = r.get("first_stage") or {}
        best, reached = first.get("best") or {}, first.get("reached") or {}
        first_rows.append(
            [
                r["seed"],
                first.get("stage"),
                len(first.get("epochs", [])),
                best.get("score"),
                best.get("epoch"),
                first.get("epoch1_started_s"),
                reached.get("epoch"),
                reached.get("trained_by_s"),
                reached.get("scored_by_s"),
            ]
        )
    columns = ["seed", "first stage", "epochs", f"best {args.metric}", "at epoch"]
    columns += ["epoch 1 start s", f">= {args.goal} at epoch", "trained by s", "scored by s"]
    parts.append(results.table(columns, first_rows))
    transfer = [r for r in runs if {"finetune", "scratch"} <= set(r.get("scores", {}))]
    if transfer:
        rows = []
        for r in transfer:
            s = r["scores"]
            compressed = s.get("compress", {})
            rows.append(
                [
                    r["seed"],
                    s["finetune"]["best"],
                    s["scratch"]["best"],
                    s["finetune"]["best"] - s["scratch"]["best"],
                    compressed.get("best"),
                    results.ratio(compressed.get("macs"), s["finetune"]["macs"]),
                ]
            )
        columns = ["seed", "finetune best", "scratch best", "gain", "compressed best"]
        parts.append(results.table([*columns, "MACs after/before"], rows))
    met = all(
        (r.get("first_stage") or {}).get("reached")
        and r["first_stage"]["reached"]["scored_by_s"] <= args.within_s
        for r in runs
    )
    lines = [
        f"first training stage >= {args.goal} {args.metric} within {args.within_s:g} s of the "
        f"command's start (scored by): {'met' if met else 'NOT met'}"
    ]
    for r in runs:
        if r["error"]:
            failed = [n for n, s in r.get("stage_status", {}).items() if s != "finished"]
            where = f"stage {failed[0]}" if failed else "before any stage"
            last = r["error"].splitlines()[-1] if r["error"] else ""
            lines.append(f"seed {r['seed']}: FAILED in {where} (exit {r['returncode']}): {last}")
    parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _stage_cell(run: dict[str, Any], name: str) -> Any:
    status = run.get("stage_status", {}).get(name)
    return run["stage_s"].get(name) if status == "finished" else status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results.setup_logging()
    info = results.machine()
    with tempfile.TemporaryDirectory(prefix="raycv-bench-") as tmp:
        storage = args.storage or Path(tmp)
        runs = [run_once(args, seed, storage / f"seed{seed}") for seed in range(args.repeats)]
    info["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    print(report(runs, info, args))
    goal = {"first_stage": args.metric, "value": args.goal, "within_s": args.within_s}
    data = {"machine": info, "config": args.config, "until": args.until, "goal": goal}
    results.write(args.out, data | {"runs": runs})
    return 1 if any(r["error"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
