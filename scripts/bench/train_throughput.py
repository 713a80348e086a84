"""End-to-end training images/s of ``raycv train`` vs the compute-only ceiling, and start-up.

* ``ceiling``: a plain PyTorch loop in this process (the same model, image size, per-step batch,
  optimizer, precision and memory format as the raycv runs) on preloaded random tensors (on
  the GPU with ``--gpu``): what the cores, or the GPU, can do when data costs nothing. Timed
  with torch threads = cores and with 1 thread (on a shared, oversubscribed machine OpenMP's
  barriers can make 2 threads slower than 1), before and after the raycv runs; the best of
  these is the ceiling (machine noise only pulls it down).
* ``raycv train``: ``python -m raycv train CONFIG overrides...`` as a subprocess, once per worker
  count.  Throughput is the median ``images_per_s`` in its ``metrics.jsonl`` over epochs >= 2
  (epoch 1 includes warm-up); start-up is epoch 1's ``epoch_started_at`` - the launch time.
  That moment comes before the first batch is asked for, so epoch 1's data wait (mostly the
  first batch: Ray Data's augmentation tasks starting) is shown next to it.
* ``bare TorchTrainer``: ``bare_trainer.py`` in a fresh subprocess with the same workers and
  CPUs, whose loop only reports the time: Ray's start-up floor, counted the same way.

Run by hand, not in CI:

    python scripts/bench/train_throughput.py                      # 32 px, 1000 images, 3 epochs
    python scripts/bench/train_throughput.py --image-size 64 --num-images 4000 --epochs 5
    python scripts/bench/train_throughput.py --config configs/seg_smoke.yaml   # segmentation
    python scripts/bench/train_throughput.py --workers 1 --where data,worker  # who augments
    python scripts/bench/train_throughput.py --config configs/det_pipeline_smoke.yaml \
        --image-size 64 --num-images 800 --batch-size 16 --workers 1 --skip-bare  # detection
    python scripts/bench/train_throughput.py --gpu --model resnet50 --image-size 224 \
        --batch-size 256 --precision bf16 --channels-last --workers 1 --where worker,data \
        --num-images 12800 --epochs 4 --skip-bare      # one GPU (issue 19's GPU benchmark)

The ceiling asks the config's task for its batch and loss (random masks for segmentation,
two random boxes per image for detection), so it times the same forward, loss and backward
as the runs. Validation is timed apart: ``val share`` is the validation pass's seconds
(``val_s`` in metrics.jsonl) over the epoch's training plus validation seconds, and ``metric
share`` the part of it spent combining the workers' states and scoring them (``val_metric_s``:
COCO mAP for detection); the goal for detection's mAP is at most 10 % of the epoch.
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GOAL = 0.9  # raycv images/s vs the ceiling
GPU_DATA_WAIT_GOAL = 0.02  # with --gpu: the share of step time spent waiting for data, at most
METRIC_GOAL = 0.10  # detection: mAP's scoring as a share of the epoch, at most
# Ray Train's 60 s default is too short for a first start on a loaded 2-core machine; a longer
# limit changes no timing, it only keeps a slow start from failing the run.
START_TIMEOUT = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    p = results.parser(__file__, __doc__, "the full results (every epoch, the machine)")
    p.add_argument(
        "--config",
        type=Path,
        default=REPO / "configs" / "smoke.yaml",
        help="raycv config the runs start from (default: configs/smoke.yaml); the options "
        "below override it",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=32,
        help="model.image_size and data.shapes.image_size (default 32)",
    )
    p.add_argument(
        "--num-images", type=int, default=1000, help="data.shapes.num_images (default 1000)"
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=3,
        help="train.epochs (default 3; at least 2, since epoch 1 is warm-up)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="train.batch_size: the global batch of one optimizer step, split over the "
        "workers; also the ceiling's batch (default 64)",
    )
    p.add_argument("--model", help="model.name (default: the config's)")
    p.add_argument(
        "--workers",
        default="1,2",
        help="comma-separated scaling.num_workers, one raycv run each (default 1,2)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        help=f"scaling.cpus_per_worker (default: cores / workers, here {cores} / N, so every "
        "run computes on all cores; Ray gives each worker that many torch threads)",
    )
    p.add_argument(
        "--ceiling-steps",
        type=int,
        default=15,
        help="timed steps of the plain PyTorch loop, per measurement (default 15)",
    )
    p.add_argument(
        "--ceiling-warmup", type=int, default=3, help="untimed steps before them (default 3)"
    )
    p.add_argument(
        "--ceiling-threads",
        default=f"{cores},1" if cores > 1 else "1",
        help="comma-separated torch thread counts the ceiling is timed with; the best counts "
        "(default: %(default)s, i.e. cores and 1)",
    )
    p.add_argument(
        "--where",
        default="data",
        help="comma-separated augment.where values, one raycv run each per worker count "
        "(default data; data,worker compares Ray Data's augmentation with the workers' own)",
    )
    p.add_argument(
        "--gpu",
        action="store_true",
        help="one GPU per worker (scaling.use_gpu=true), the ceiling on this process's GPU",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="train.precision, the ceiling under the same autocast (default fp32; fp16 "
        "needs --gpu)",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="train.channels_last=true, the ceiling's model and images channels_last too",
    )
    p.add_argument(
        "--skip-bare", action="store_true", help="leave out the bare TorchTrainer start-ups"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600,
        help="seconds each subprocess may run before it is stopped (default 600)",
    )
    p.add_argument(
        "--storage",
        type=Path,
        help="keep the raycv run folders here (default: a temporary folder, removed at the end)",
    )
    args = p.parse_args(argv)
    for name in ("workers", "ceiling_threads"):
        flag, text = f"--{name.replace('_', '-')}", getattr(args, name)
        try:
            counts = list(dict.fromkeys(int(n) for n in text.split(",")))
        except ValueError:
            p.error(f"{flag} takes comma-separated integers, e.g. 2,1 (got {text!r})")
        if min(counts) < 1:
            p.error(f"{flag}: every count must be at least 1 (got {text!r})")
        setattr(args, name, counts)
    args.where = list(dict.fromkeys(args.where.split(",")))
    if not set(args.where) <= {"auto", "data", "worker"}:
        p.error(f"--where takes auto, data and worker, comma-separated (got {args.where})")
    if args.epochs < 2:
        p.error("--epochs must be at least 2: epoch 1 is warm-up and is not counted")
    if args.ceiling_steps < 1:
        p.error("--ceiling-steps must be at least 1")
    return args


def overrides(
    args: argparse.Namespace, workers: int, storage: Path, where: str = "data"
) -> list[str]:
    cpus = args.cpus_per_worker or (os.cpu_count() or 1) / workers
    return [
        f"augment.where={where}",
        "experiment=bench",
        f"run.storage={storage}",
        f"data.shapes.num_images={args.num_images}",
        f"data.shapes.image_size={args.image_size}",
        f"model.image_size={args.image_size}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        f"train.precision={args.precision}",
        f"train.channels_last={str(args.channels_last).lower()}",
        f"scaling.use_gpu={str(args.gpu).lower()}",
        f"scaling.num_workers={workers}",
        f"scaling.cpus_per_worker={cpus:g}",
        *([f"model.name={args.model}"] if args.model else []),
    ]


# ---------------------------------------------------------------- ceiling: compute only


def ceiling(cfg, threads: int, steps: int, warmup: int) -> dict[str, float]:
    """Images/s of forward + loss + backward + optimizer step on preloaded random tensors,
    on the GPU when the runs use one, under the runs' autocast and memory format."""
    import torch

    from raycv.data.shapes import class_names
    from raycv.loop import AMP_DTYPES
    from raycv.models import create_model
    from raycv.optim import build_optimizer
    from raycv.tasks import TASKS, build_task, total

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    size, batch = cfg.model.image_size, cfg.train.batch_size
    names = class_names(cfg.data.shapes.num_classes, cfg.data.shapes.classes)
    if "mask" in TASKS.get(cfg.task).targets:
        names = ["background", *names]  # as the shapes source names them
    task = build_task(cfg, names)
    m = cfg.model
    device = torch.device("cuda" if cfg.scaling.use_gpu else "cpu")
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = create_model(m.name, len(names), m.weights, size, m.encoder)
    model = model.to(device, memory_format=layout).train()
    optimizer = build_optimizer(model, cfg.optimizer, cfg.optimizer.lr)
    amp = AMP_DTYPES.get(cfg.train.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    k = cfg.data.max_boxes
    batches = [
        on_device(random_batch(task.targets, len(names), batch, size, k), device, layout)
        for _ in range(4)
    ]

    def step(i: int) -> None:
        batch_i = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = total(task.loss(task.forward(model, batch_i), batch_i))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    _synchronize(device)
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    _synchronize(device)
    seconds = time.perf_counter() - started
    return {
        "steps": steps,
        "seconds": seconds,
        "images_per_s": steps * batch / seconds,
        "torch_threads": torch.get_num_threads(),
    }


def random_batch(
    targets: tuple[str, ...], classes: int, batch: int, size: int, max_boxes: int
) -> dict:
    """Random images with the task's target columns, shaped as the loop receives them: for
    detection, two boxes per image (an eighth to half the side) and padding after them."""
    import torch

    if "boxes" in targets:
        corner = torch.rand(batch, max_boxes, 2) * size / 2
        sides = (torch.rand(batch, max_boxes, 2) * 3 + 1) * size / 8
        labels = torch.randint(classes, (batch, max_boxes))
        labels[:, 2:] = -1
        boxes = torch.cat([corner, corner + sides], -1)
        return {"image": torch.randn(batch, 3, size, size), "boxes": boxes, "labels": labels}
    shapes = {"label": (batch,), "mask": (batch, size, size)}
    dtypes = {"label": torch.int64, "mask": torch.uint8}
    return {
        "image": torch.randn(batch, 3, size, size),
        **{t: torch.randint(classes, shapes[t], dtype=dtypes[t]) for t in targets},
    }


def on_device(batch: dict, device, layout) -> dict:
    """A random batch preloaded where the model runs, its images in the model's layout."""
    moved = {k: v.to(device) for k, v in batch.items()}
    moved["image"] = moved["image"].contiguous(memory_format=layout)
    return moved


def _synchronize(device) -> None:
    """CUDA runs asynchronously: a clock read needs the queued steps finished."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- subprocesses


def launch(cmd: list[str], timeout: float, log_file: Path) -> tuple[float, str]:
    """Run ``cmd``; return its launch wall time and its stdout.  Its output goes to ``log_file``."""
    env = {**os.environ, **{k: v for k, v in START_TIMEOUT.items() if k not in os.environ}}
    launched = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    log_file.write_text(
        f"$ {' '.join(cmd)}\n\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(
            f"exit status {proc.returncode}; full log in {log_file} (kept with --storage):\n{tail}"
        )
    return launched, proc.stdout


def raycv_run(
    args: argparse.Namespace, workers: int, where: str, storage: Path, logs: Path
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "raycv", "train", str(args.config)]
    cmd += overrides(args, workers, storage, where)
    started = time.perf_counter()
    launched, stdout = launch(cmd, args.timeout, logs / f"raycv-{workers}w-{where}.log")
    wall = time.perf_counter() - started
    run_dir = Path(stdout.strip().splitlines()[-1])  # the command's last line: its run folder
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [e for e in epochs if e["epoch"] >= 2]
    return {
        "command": cmd,
        "run_dir": str(run_dir),
        "wall_s": wall,
        "startup_s": epochs[0]["epoch_started_at"] - launched,
        "epoch1_data_wait_s": epochs[0]["data_wait"] * epochs[0]["epoch_s"],
        "images_per_s": results.median([e["images_per_s"] for e in steady]),
        "data_wait": results.median([e["data_wait"] for e in steady]),
        "val_share": results.median([e["val_s"] / (e["epoch_s"] + e["val_s"]) for e in steady]),
        "metric_share": results.median(
            [e["val_metric_s"] / (e["epoch_s"] + e["val_s"]) for e in steady]
        ),
        "epochs": [
            {k: e.get(k) for k in ("epoch", "images_per_s", "data_wait", "epoch_s", "val_s")}
            | {"val_metric_s": e.get("val_metric_s")}
            for e in epochs
        ],
    }


def bare_run(args: argparse.Namespace, workers: int, logs: Path) -> dict[str, Any]:
    cpus = args.cpus_per_worker or (os.cpu_count() or 1) / workers
    cmd = [sys.executable, str(HERE / "bare_trainer.py"), f"--num-workers={workers}"]
    cmd += [f"--cpus-per-worker={cpus:g}"]
    launched, stdout = launch(cmd, args.timeout, logs / f"bare-{workers}w.log")
    t = json.loads(stdout.strip().splitlines()[-1])
    return {
        "command": cmd,
        "startup_s": t["first_report_at"] - launched,
        "imports_s": t["imported_at"] - launched,
        "ray_init_s": t["ray_up_at"] - t["imported_at"],
        "trainer_to_first_report_s": t["first_report_at"] - t["ray_up_at"],
        "worker_torch_threads": t["worker_torch_threads"],
        "ray_logical_cpus": t["ray_logical_cpus"],
    }


# ---------------------------------------------------------------- driver


def run(args: argparse.Namespace, storage: Path) -> dict[str, Any]:
    from raycv.config import load_config

    # Validate every run's config here first: a typo fails in seconds, not after Ray starts.
    plan = [(w, where) for w in args.workers for where in args.where]
    configs = {
        (w, where): load_config(args.config, overrides(args, w, storage, where))
        for w, where in plan
    }
    first = configs[plan[0]]
    logs = storage / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)

    def ceilings(when: str) -> dict[str, dict[str, float]]:
        log.info("ceiling %s: %d steps of a plain PyTorch loop ...", when, args.ceiling_steps)
        return {
            str(t): ceiling(first, t, args.ceiling_steps, args.ceiling_warmup)
            for t in args.ceiling_threads
        }

    before = ceilings("before the runs")
    runs: dict[str, dict[str, Any]] = {}
    for w, where in plan:
        key = f"{w}" if len(args.where) == 1 else f"{w} {where}"
        runs[key] = {
            "workers": w,
            "where": where,
            "cpus_per_worker": configs[w, where].scaling.cpus_per_worker,
        }
        log.info("raycv train, %d worker(s), augment.where=%s ...", w, where)
        try:
            runs[key]["raycv"] = raycv_run(args, w, where, storage, logs)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            log.error("raycv train with %d worker(s) failed: %s", w, e)
            runs[key]["raycv"] = {"error": str(e)}
        if not args.skip_bare and where == args.where[0]:
            log.info("bare TorchTrainer, %d worker(s) ...", w)
            try:
                runs[key]["bare"] = bare_run(args, w, logs)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                log.error("bare TorchTrainer with %d worker(s) failed: %s", w, e)
                runs[key]["bare"] = {"error": str(e)}
    after = ceilings("after the runs")
    torch_threads = {  # the ceiling per thread count: the better of before and after
        t: max(before[t]["images_per_s"], after[t]["images_per_s"]) for t in before
    }
    best = max(torch_threads.values())
    for r in runs.values():
        r["raycv"]["vs_ceiling"] = results.ratio(r["raycv"].get("images_per_s"), best)
    return {
        "model": first.model.name,
        "task": first.task,
        "ceiling": {
            "images_per_s": best,
            "by_threads": torch_threads,
            "before": before,
            "after": after,
        },
        "runs": runs,
        "overrides": {f"{w} {where}": overrides(args, w, storage, where) for w, where in plan},
    }


def report(out: dict[str, Any], args: argparse.Namespace) -> str:
    c = out["ceiling"]
    speed_rows: list[tuple] = []
    for t, value in c["by_threads"].items():
        before, after = c["before"][t]["images_per_s"], c["after"][t]["images_per_s"]
        speed_rows.append(
            (
                f"ceiling: plain PyTorch loop, {_plural(t, 'thread')}",
                value,
                results.ratio(value, c["images_per_s"]),
                None,
                None,
                None,
                f"before {before:.0f}, after {after:.0f}",
            )
        )
    start_rows: list[tuple] = []
    verdicts = []
    for key, r in out["runs"].items():
        w, raycv, bare = r["workers"], r["raycv"], r.get("bare", {})
        name = f"raycv train, {_plural(w, 'worker')} x {r['cpus_per_worker']:g} CPU"
        name += f", augment.where={r['where']}" if key != str(w) else ""
        if "error" in raycv:
            speed_rows.append((name, "failed", None, None, None, None, ""))
        else:
            per_epoch = " ".join(f"{e['images_per_s']:.0f}" for e in raycv["epochs"])
            shares = [f"{raycv[k]:.0%}" for k in ("data_wait", "val_share", "metric_share")]
            speed_rows.append(
                (name, raycv["images_per_s"], raycv["vs_ceiling"], *shares, per_epoch)
            )
            met = "met" if raycv["vs_ceiling"] >= GOAL else "NOT met"
            verdicts.append(f"{key} {met} ({raycv['vs_ceiling']:.2f}x)")
            if args.gpu:
                met = "met" if raycv["data_wait"] <= GPU_DATA_WAIT_GOAL else "NOT met"
                verdicts.append(f"data wait <= {GPU_DATA_WAIT_GOAL:.0%} {met}")
            if out["task"] == "detection":
                met = "met" if raycv["metric_share"] <= METRIC_GOAL else "NOT met"
                verdicts.append(f"mAP scoring <= {METRIC_GOAL:.0%} of the epoch {met}")
        raycv_start, bare_start = raycv.get("startup_s"), bare.get("startup_s")
        start_rows.append(
            (
                key,
                raycv_start,
                raycv.get("epoch1_data_wait_s"),
                bare_start,
                raycv_start - bare_start if raycv_start and bare_start else None,
                _breakdown(bare),
            )
        )
    lines = [
        results.table(
            [
                "run",
                "images/s",
                "vs ceiling",
                "data wait",
                "val share",
                "metric share",
                "images/s per epoch",
            ],
            speed_rows,
        ),
        "",
        f"goal: raycv >= {GOAL}x the best ceiling: " + (", ".join(verdicts) or "no run finished"),
        f"raycv: median over epoch{'s 2-' if args.epochs > 2 else ' '}{args.epochs}; "
        f"ceiling: better of before/after, {args.ceiling_steps} steps each; "
        f"{out['model']} ({out['task']}), {args.image_size} px, global batch "
        f"{args.batch_size}, {args.precision}{', channels_last' if args.channels_last else ''}, "
        f"{'one GPU per worker' if args.gpu else 'CPU'}, the config's optimizer",
        "",
        results.table(
            [
                "start-up (s)",
                "raycv: launch to epoch 1",
                "+ epoch-1 data wait",
                "bare TorchTrainer",
                "raycv extra",
                "bare = imports + ray.init + trainer",
            ],
            start_rows,
        ),
    ]
    return "\n".join(lines)


def _plural(count: str | int, noun: str) -> str:
    return f"{count} {noun}{'' if str(count) == '1' else 's'}"


def _breakdown(bare: dict[str, Any]) -> str:
    if "startup_s" not in bare:
        return "failed" if "error" in bare else ""
    return (
        f"{bare['imports_s']:.1f} + {bare['ray_init_s']:.1f} + "
        f"{bare['trainer_to_first_report_s']:.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results.setup_logging()
    info = results.machine()
    info["omp_num_threads_env"] = os.environ.get("OMP_NUM_THREADS")
    with tempfile.TemporaryDirectory(prefix="raycv-bench-") as tmp:
        storage = (args.storage or Path(tmp)).expanduser().resolve()
        out = run(args, storage)
    info["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    data = {
        "benchmark": "train_throughput",
        "machine": info,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "goal": {"raycv_vs_ceiling": GOAL}
        | ({"gpu_data_wait": GPU_DATA_WAIT_GOAL} if args.gpu else {}),
        **out,
    }
    print(results.header("Training images/s: raycv train vs a plain PyTorch loop", info))
    print()
    print(report(out, args))
    results.write(args.out, data)
    failed = any(
        "error" in r["raycv"] or "error" in r.get("bare", {}) for r in out["runs"].values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
