"""Detectors side by side on the built-in shapes at equal wall-clock: mAP, speed, mAP per ms.

For each of ``--models`` (``yolo_n``, ``yolo_s``, ``fasterrcnn_mobilenet_v3_large_320_fpn``,
``ssdlite320_mobilenet_v3_large``), one after the other on the same cores, the bench runs
``raycv train CONFIG ...`` (``--config``, default ``configs/det_quickstart.yaml``) as a
subprocess for ``--budget-s`` seconds counted from its command's launch (imports, generating
and caching the shapes and Ray's start-up included), polls the run folder's ``metrics.jsonl``
every 2 s and stamps each epoch when it first sees it (up to 2 s of polling lag), then stops
the run. Every model trains on the same data with the same recipe: the config's
``pipeline.pretrain`` overrides (the quickstart's source task: ``shapes``, task detection,
difficulty easy, classes circle, square, triangle, star, cross, arrow, 3000 images of 64 px,
``data.val_fraction`` 0.1, so 2700 train / 300 val; seed 0) and the rest of the config
(``max_boxes`` 10, augmentation scale 0.6-1 without rotation, AdamW with weight decay 0.01,
cosine with a 1-epoch warm-up, batch 16, 1 worker x 2 CPUs), from scratch, with
``finetune`` cleared as the pipeline's pretrain stage does (and ``compress``, unused by
``raycv train``, whose channel pruning the torchvision detectors would fail). Each model
gets the image size, learning rate and schedule length that suit it (``RECIPES``;
``--model-arg`` changes them):

* ``yolo_n``, ``yolo_s``: 64 px (the shapes' own size, a multiple of 32), AdamW 3e-3 (the
  quickstart's).
* ``fasterrcnn_mobilenet_v3_large_320_fpn``: 64 px (its smallest: raycv keeps its inputs at
  ``model.image_size``; an easy shape's circumscribed diameter is 55-85 % of the side, 35-55
  px, already the size of its smallest anchors, 32 and 64 px, so upscaling would only cost
  time), AdamW 1e-3 (``configs/det_smoke.yaml``'s for it; torchvision's references train it
  with SGD 0.02 from ImageNet weights, not from scratch).
* ``ssdlite320_mobilenet_v3_large``: fed 64 px, which it resizes to 320 px inside (its
  anchors are fixed for that size, so its cost does not depend on ``model.image_size``),
  AdamW 1e-3 (the references' SGD 0.15 is tuned for 600 epochs).

``train.epochs`` (the cosine's length) is 12, 9, 6 and 3 in that order: first guesses at
what fits in 600 s on 2 idle cores, not yet measured there. The table's ``s/epoch`` tells
whether a schedule fits; one longer than the budget is cut with its learning rate still
high, one shorter finishes early, so set ``--model-arg MODEL:train.epochs=N`` from a first
run before trusting a ranking.

The bench reports per model: the best val mAP@.5 (``val_map50``) and the best mAP@[.5:.95]
(``val_map``) among the epochs whose validation ended within the budget, when mAP@.5 first
reached ``--target`` (0.80; seconds from launch) or none, the epochs done, the CPU latency at
batch 1 (``raycv.model_stats.latency_ms(model, S, 1, threads=1, runtime="eager")``: median of
20 eval-mode forwards with post-processing, in this process after the run, on the run's best
checkpoint loaded with ``raycv.artifacts.load_trained``, the best by raycv's own checkpoint
metric, ``val_map``, which may be an epoch that landed after the budget; latency depends on
the architecture and input size, the weights only change how many boxes reach NMS) and the
best mAP@.5 per millisecond of that latency. A model with no epoch in the budget has none.
The goal lines check that ``yolo_n`` or ``yolo_s`` reaches mAP@.5 >= 0.80 within 600 s of
its command's start, and that the table's best mAP@.5 per ms is a yolo (models without a
score are named). Run by hand, not in CI:

    python scripts/bench/det_shapes.py                                # 4 x 10 min
    python scripts/bench/det_shapes.py --models yolo_n,yolo_s --budget-s 300
    python scripts/bench/det_shapes.py --model-arg ssdlite320_mobilenet_v3_large:train.epochs=4
    python scripts/bench/det_shapes.py --storage ~/det-shapes        # keep the run folders
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import budget
import results

log = logging.getLogger("bench")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
EXPERIMENT = "bench-det-shapes"
GOAL_S = 600.0  # the goal's wall-clock, from the command's start
TARGET = 0.80  # mAP@.5 the goal asks for
# Each model's own settings, as dotted overrides after the config's pretrain recipe.
RECIPES: dict[str, dict[str, Any]] = {
    "yolo_n": {"model.image_size": 64, "optimizer.lr": 3e-3, "train.epochs": 12},
    "yolo_s": {"model.image_size": 64, "optimizer.lr": 3e-3, "train.epochs": 9},
    "fasterrcnn_mobilenet_v3_large_320_fpn": {
        "model.image_size": 64,
        "model.encoder": None,
        "optimizer.lr": 1e-3,
        "train.epochs": 6,
    },
    "ssdlite320_mobilenet_v3_large": {
        "model.image_size": 64,
        "model.encoder": None,
        "optimizer.lr": 1e-3,
        "train.epochs": 3,
    },
}
# What the bench keeps of each raycv epoch (besides its stamps and every val_ap/<class>).
RAYCV_KEYS = ("epoch", "train_loss", "lr", "images_per_s", "epoch_s", "val_map", "val_map50")
RAYCV_KEYS += ("val_map75", "params", "macs", "latency_ms")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = results.parser(__file__, __doc__, "the full results (every epoch of every model)")
    run = p.add_argument_group("measurement")
    run.add_argument(
        "--models",
        default=",".join(RECIPES),
        help=f"comma-separated detectors, each run for the budget (default: {','.join(RECIPES)})",
    )
    run.add_argument(
        "--budget-s",
        type=float,
        default=600,
        help="wall-clock seconds each model gets, from its command's launch (default 600)",
    )
    run.add_argument(
        "--target",
        type=float,
        default=TARGET,
        help="the mAP@.5 whose first epoch the table times (default %(default)s)",
    )
    run.add_argument(
        "--config",
        type=Path,
        default=REPO / "configs" / "det_quickstart.yaml",
        help="raycv config every run starts from, with its pipeline.pretrain overrides applied "
        "(default: configs/det_quickstart.yaml)",
    )
    run.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="MODEL:KEY=VALUE",
        help="a dotted override for one model's run, after its recipe, e.g. "
        "yolo_s:train.epochs=8 (repeatable)",
    )
    run.add_argument(
        "--raycv-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dotted override for every model's run, after the recipes (repeatable)",
    )
    run.add_argument(
        "--latency-threads",
        type=int,
        default=1,
        help="torch threads of the batch-1 latency measurement (default 1)",
    )
    run.add_argument(
        "--storage",
        type=Path,
        help="keep each model's run folder under DIR/<model>/ (default: a temporary folder, "
        "deleted at the end)",
    )
    args = p.parse_args(argv)
    budget.check_raycv_args(p, args)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in RECIPES]
    if unknown or not args.models:
        p.error(f"--models takes some of {', '.join(RECIPES)} (got {unknown or 'none'})")
    args.model_overrides = {m: [] for m in args.models}
    for item in args.model_arg:
        model, sep, override = item.partition(":")
        if not sep or "=" not in override or model not in RECIPES:
            p.error(f"--model-arg takes MODEL:KEY=VALUE, e.g. yolo_s:train.epochs=8 (got {item!r})")
        if model in args.model_overrides:
            args.model_overrides[model].append(override)
    if args.budget_s <= 0 or args.latency_threads < 1:
        p.error("--budget-s and --latency-threads must be positive")
    if args.storage:
        args.storage = args.storage.expanduser().resolve()
    return args


def recipe_overrides(config: Path) -> list[str]:
    """The config's ``pipeline.pretrain`` as dotted overrides (values as JSON, which YAML
    reads), with ``finetune`` cleared as the pipeline's pretrain stage does, and ``compress``
    too (``raycv train`` never compresses, and the quickstart's channel pruning would refuse
    torchvision's detectors when the config is checked)."""
    from raycv.config import ConfigError, load_given
    from raycv.sweep.space import flatten

    try:
        pretrain = (load_given(config).get("pipeline") or {}).get("pretrain") or {}
    except (ConfigError, OSError, ValueError) as e:
        raise SystemExit(f"error: {config}: {e}") from e
    return [f"{k}={json.dumps(v)}" for k, v in flatten(pretrain).items()] + [
        "finetune={}",
        "compress={}",
    ]


def model_overrides(args: argparse.Namespace, model: str, storage: Path) -> list[str]:
    own = [f"{k}={json.dumps(v)}" for k, v in RECIPES[model].items()]
    return [
        *recipe_overrides(args.config),
        f"model.name={model}",
        *own,
        f"experiment={EXPERIMENT}",
        f"run.storage={storage}",
        *args.raycv_arg,
        *args.model_overrides[model],
    ]


# ---------------------------------------------------------------- one model


def run_model(model: str, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    storage = (args.storage / model) if args.storage else logs / "runs"
    overrides = model_overrides(args, model, storage)
    cmd = budget.raycv_command(args.config, overrides)
    from raycv.config import load_config

    cfg = load_config(args.config, overrides)
    launched = time.time()
    metrics = budget.RaycvMetrics(storage / EXPERIMENT, launched, RAYCV_KEYS, ("val_ap/",))
    watched = budget.watch(cmd, launched, args.budget_s, metrics.poll, logs)
    error = budget.failed(watched, logs)
    out = budget.summarise(cmd, metrics.epochs, watched, error, args.budget_s, "val_map50")
    counted = [e for e in metrics.epochs if e["seconds"] <= args.budget_s]
    scored = [e for e in counted if e.get("val_map") is not None]
    reached = next((e for e in scored if e["val_map50"] >= args.target), None)
    shapes = cfg.data.shapes
    out |= {
        "data": f"shapes {shapes.difficulty}, {len(shapes.classes or ()) or shapes.num_classes} "
        f"classes, {shapes.num_images} images at {shapes.image_size} px, val "
        f"{cfg.data.val_fraction:.0%}",
        "epoch_s": results.median([e["epoch_s"] for e in counted if e.get("epoch_s")]),
        "image_size": cfg.model.image_size,
        "lr": cfg.optimizer.lr,
        "epochs_scheduled": cfg.train.epochs,
        "best_map": max(scored, key=lambda e: e["val_map"], default=None),
        "target": args.target,
        "reached_target": reached,
        "run_folder": str(metrics.folder) if metrics.folder else None,
    }
    out |= latency(metrics.folder, cfg.model.image_size, args.latency_threads)
    best50 = out["best"]["val_map50"] if out["best"] else None
    ms = out["latency_ms"]
    out["map50_per_ms"] = best50 / ms if best50 is not None and ms else None
    return out


def latency(folder: Path | None, size: int, threads: int) -> dict[str, Any]:
    """Batch-1 CPU latency of the run's best checkpoint, or why there is none."""
    from raycv.artifacts import load_trained
    from raycv.errors import DataError
    from raycv.model_stats import latency_ms

    if folder is None:
        return {"latency_ms": None, "latency_error": "no run folder"}
    trained, errors = None, []
    for where in (folder, folder / "best"):  # an interrupted run has best/ but no manifest path
        try:
            trained = load_trained(where)
            break
        except (FileNotFoundError, DataError) as e:
            errors.append(str(e))
    if trained is None:
        return {"latency_ms": None, "latency_error": errors[-1]}
    ms = latency_ms(trained.model, size, 1, threads=threads, runtime="eager")
    log.info("latency at batch 1, %d thread(s): %.1f ms (%s)", threads, ms, trained.checkpoint)
    return {
        "latency_ms": ms,
        "latency_threads": threads,
        "checkpoint": str(trained.checkpoint),
        "checkpoint_epoch": trained.metrics.get("epoch"),
    }


def run(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, Any]]:
    methods = {m: functools.partial(run_model, m) for m in args.models}
    return budget.run(args, tmp, methods)


# ---------------------------------------------------------------- report


def report(out: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    rows = []
    for model, m in out.items():
        best, best_map, reached = m["best"] or {}, m["best_map"] or {}, m["reached_target"] or {}
        rows.append(
            (
                model + (" FAILED" if m["error"] else ""),
                m["image_size"],
                f"{m['lr']:g}",
                f"{m['epochs_within_budget']}/{m['epochs_scheduled']}",
                m["epoch_s"],
                budget.score(best.get("val_map50")),
                best.get("seconds"),
                budget.score(best_map.get("val_map")),
                reached.get("seconds"),
                m["epoch1_started_s"],
                m["latency_ms"],
                None if m["map50_per_ms"] is None else f"{m['map50_per_ms']:.4f}",
            )
        )
    columns = ["model", "S", "lr", "epochs", "s/epoch", "best mAP@.5", "at s"]
    columns += ["best mAP@[.5:.95]"]
    columns += [f"mAP@.5>={args.target:g} at s", "epoch 1 start s", "latency ms", "mAP@.5/ms"]
    lines = [
        results.table(columns, rows),
        "",
        *goal_lines(out),
        f"budget {args.budget_s:.0f} s per model from launch, one after the other; "
        f"{args.config.name}'s pretrain recipe ({next(iter(out.values()))['data']}); "
        f"epochs = within budget / scheduled, s/epoch = median training time; latency: batch 1, "
        f"{args.latency_threads} thread(s), eager, best checkpoint; epochs stamped when the "
        f"bench saw them (polled every {budget.POLL_S:.0f} s)",
    ]
    return "\n".join(lines)


def goal_lines(out: dict[str, dict[str, Any]]) -> list[str]:
    yolos = [m for m in out if m.startswith("yolo")]
    claim = f"goal: yolo_n or yolo_s reaches mAP@.5 >= {TARGET:.2f} within {GOAL_S:.0f} s"
    if not yolos:
        first = f"{claim}: not checked (no yolo in --models)"
    else:
        times = {m: _time_to(out[m], TARGET, GOAL_S) for m in yolos}
        met = [m for m, t in times.items() if t is not None]
        shown = ", ".join(
            f"{m} {'never' if t is None else f'at {t:.0f} s'}" for m, t in times.items()
        )
        first = f"{claim}: {'met' if met else 'NOT met'} ({shown})"
    ratios = {m: v["map50_per_ms"] for m, v in out.items() if v["map50_per_ms"] is not None}
    unscored = [m for m in out if m not in ratios]
    claim = "goal: the best mAP@.5 per ms is a yolo"
    if not ratios or len(out) < 2 or not yolos:
        second = f"{claim}: not checked (needs a yolo and another model, one with a score)"
    else:
        top = max(ratios, key=ratios.get)
        verdict = "met" if top.startswith("yolo") else "NOT met"
        also = f"; no score: {', '.join(unscored)}" if unscored else ""
        second = f"{claim}: {verdict} ({top} {ratios[top]:.4f}/ms{also})"
    return [first, second]


def _time_to(m: dict[str, Any], target: float, within: float) -> float | None:
    """Seconds from launch to the first epoch at ``target`` mAP@.5 scored within ``within``."""
    for e in m["epochs"]:
        if e["seconds"] <= within and (e.get("val_map50") or 0) >= target:
            return e["seconds"]
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    goal = {"yolo_map50": TARGET, "within_s": GOAL_S, "best_map50_per_ms": "yolo"}
    title = "Detectors on shapes at equal wall-clock: mAP@.5, batch-1 latency, mAP@.5 per ms"
    out = budget.measure(args, run, "det_shapes", goal, title, ())
    print(report(out, args))
    return 1 if any(m["error"] for m in out.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
