"""Validation accuracy in a wall-clock budget on real photos: raycv vs a plain torchvision script.

Both train a ResNet-18 from scratch on the same ImageFolder (by default the 6-class clothing
photos in ``../shared/data/clothing6``) at the same image size S and batch size, one after the
other on the same cores, each for ``--budget-s`` seconds counted from its command's launch, so
Python imports, data loading and start-up are part of what each pays:

* ``seed recipe``: the plain script this project started from, run as a subprocess (this file
  with a hidden ``--seed-recipe``): ``ImageFolder`` + PIL ``transforms.Compose`` (random
  resized crop, horizontal and vertical flip, rotation 30 degrees, colour jitter 0.2,
  normalise), a shuffled ``DataLoader`` with ``--loader-workers`` processes, torchvision's
  ``resnet18``, Adam at 1e-3, cross-entropy; after every epoch it evaluates on the validation
  split (resize, centre crop) and prints one JSON line, stamped with its own clock.
* ``raycv``: ``raycv train CONFIG data.folder.root=... model.image_size=S train.batch_size=B``
  (``--config``, default ``configs/folder.yaml``); the bench polls the run folder's
  ``metrics.jsonl`` every 2 s and stamps each epoch when it first sees it (so raycv's epochs
  carry up to 2 s of polling lag), then stops the run when the budget is spent.

An epoch counts only if its validation finished within the budget.  The table gives each
method's epochs, its best validation accuracy and when it got there; the goal line checks
raycv >= seed recipe + 5 points.  Run by hand, not in CI:

    python scripts/bench/real_photos.py                         # 2 x 10 min, S=112, batch 32
    python scripts/bench/real_photos.py --budget-s 300 --image-size 64
    python scripts/bench/real_photos.py --raycv-arg optimizer.lr=3e-3 --raycv-arg train.epochs=60
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import budget
import results

log = logging.getLogger("bench")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GOAL = 0.05  # raycv's best val accuracy over the seed recipe's, in accuracy (5 points)
EXPERIMENT = "bench-real-photos"
# What the bench keeps of each raycv epoch (besides its stamps).
RAYCV_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = results.parser(__file__, __doc__, "the full results (every epoch of both, the machine)")
    results.add_photo_folder(p.add_argument_group("data"))
    run = p.add_argument_group("measurement")
    run.add_argument(
        "--image-size",
        type=int,
        default=112,
        help="training crop side S of both methods; raycv's model.image_size (default 112)",
    )
    run.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="batch size of both methods; raycv's train.batch_size (default 32)",
    )
    run.add_argument(
        "--budget-s",
        type=float,
        default=600,
        help="wall-clock seconds each method gets, from its command's launch (default 600)",
    )
    run.add_argument(
        "--loader-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="the seed recipe's DataLoader worker processes "
        f"(default: os.cpu_count() = {os.cpu_count()})",
    )
    run.add_argument(
        "--config",
        type=Path,
        default=REPO / "configs" / "folder.yaml",
        help="raycv config the raycv run starts from (default: configs/folder.yaml)",
    )
    budget.add_method_options(run, ("seed", "raycv"))
    # The seed recipe's own process: this file again, told when its command was launched.
    p.add_argument("--seed-recipe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--launched-at", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("image_size", "batch_size", "budget_s", "loader_workers"):
        if getattr(args, name) < (0 if name == "loader_workers" else 1):
            p.error(f"--{name.replace('_', '-')} is too small (got {getattr(args, name)})")
    budget.check_raycv_args(p, args)
    results.check_photo_folder(args)
    return args


# ---------------------------------------------------------------- the seed recipe (subprocess)


def seed_transforms(size: int):
    """The seed script's train and eval Compose. Not data_throughput's: that one takes raycv's
    augment settings (crop scale 0.35-1), the seed script used torchvision's defaults (0.08-1)."""
    from torchvision import transforms as T

    normalise = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = [
        T.RandomResizedCrop(size),
        T.RandomHorizontalFlip(),
        T.RandomVerticalFlip(),
        T.RandomRotation(30, interpolation=T.InterpolationMode.BILINEAR),
        T.ColorJitter(0.2, 0.2, 0.2),
    ]
    return T.Compose(train + normalise), T.Compose([T.Resize(size), T.CenterCrop(size), *normalise])


def seed_recipe(args: argparse.Namespace) -> None:
    """Train until the budget (from --launched-at) is spent; one JSON line per finished epoch."""
    import torch
    from torchvision import datasets, models

    deadline = args.launched_at + args.budget_s
    train_tf, eval_tf = seed_transforms(args.image_size)
    train_set = datasets.ImageFolder(str(args.root / "train"), transform=train_tf)
    val_set = datasets.ImageFolder(str(args.root / args.val_split), transform=eval_tf)
    if val_set.classes != train_set.classes:
        raise SystemExit(f"error: {args.val_split}/ classes {val_set.classes} differ from train/")
    loader = torch.utils.data.DataLoader
    workers = args.loader_workers
    train = loader(train_set, args.batch_size, shuffle=True, num_workers=workers, drop_last=True)
    val = loader(val_set, args.batch_size, shuffle=False, num_workers=workers)
    torch.manual_seed(0)
    model = models.resnet18(num_classes=len(train_set.classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in itertools.count(1):
        started = time.time() - args.launched_at
        fit = seed_pass(model, train, deadline, optimizer)
        check = seed_pass(model, val, deadline) if fit else None
        if check is None:
            return  # the budget ran out inside this epoch: it does not count
        row = {"epoch": epoch, "seconds": time.time() - args.launched_at}
        row |= {"epoch_started_s": started, "first_batch_s": fit.pop("first_batch_s")}
        row |= {f"train_{k}": v for k, v in fit.items()}
        row |= {f"val_{k}": v for k, v in check.items() if k != "first_batch_s"}
        print(json.dumps(row), flush=True)


def seed_pass(model, loader, deadline: float, optimizer=None) -> dict[str, float] | None:
    """One pass over ``loader``, training when an optimizer is given; None once past the
    deadline (checked every batch, so the process stops at the budget, not an epoch later)."""
    import torch
    import torch.nn.functional as F

    model.train(optimizer is not None)
    loss_sum, correct, seen, first_batch_s = 0.0, 0, 0, None
    started = time.perf_counter()
    with torch.set_grad_enabled(optimizer is not None):
        for images, labels in loader:
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - started
            if time.time() > deadline:
                return None
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            if optimizer is not None:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
    return {"loss": loss_sum / seen, "acc": correct / seen, "first_batch_s": first_batch_s}


# ---------------------------------------------------------------- the two methods


def run_seed(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    launched = time.time()
    cmd = [sys.executable, __file__, "--seed-recipe", f"--launched-at={launched!r}"]
    cmd += [f"--root={args.root}", f"--val-split={args.val_split}"]
    cmd += [f"--image-size={args.image_size}", f"--batch-size={args.batch_size}"]
    cmd += [f"--budget-s={args.budget_s}", f"--loader-workers={args.loader_workers}"]
    lines = budget.JsonLines(logs / "stdout")
    watched = budget.watch(cmd, launched, args.budget_s, lines.poll, logs)
    error = budget.failed(watched, logs)
    return budget.summarise(cmd, lines.epochs, watched, error, args.budget_s)


def raycv_overrides(args: argparse.Namespace, storage: Path) -> list[str]:
    return [
        f"data.folder.root={args.root}",
        f"data.folder.val_split={args.val_split}",
        f"model.image_size={args.image_size}",
        f"train.batch_size={args.batch_size}",
        f"experiment={EXPERIMENT}",
        f"run.storage={storage}",
        *args.raycv_arg,
    ]


def run_raycv(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    storage = logs / "runs"
    cmd = budget.raycv_command(args.config, raycv_overrides(args, storage))
    launched = time.time()
    metrics = budget.RaycvMetrics(storage / EXPERIMENT, launched, RAYCV_KEYS)
    watched = budget.watch(cmd, launched, args.budget_s, metrics.poll, logs)
    error = budget.failed(watched, logs)
    return budget.summarise(cmd, metrics.epochs, watched, error, args.budget_s)


# ---------------------------------------------------------------- driver


def run(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, Any]]:
    return budget.run(args, tmp, {"seed": run_seed, "raycv": run_raycv})


def report(out: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    names = {"seed": "seed recipe (torchvision script)", "raycv": f"raycv ({args.config.name})"}
    rows = []
    for key, m in out.items():
        best = m["best"] or {}
        rows.append(
            (
                names[key] + (" FAILED" if m["error"] else ""),
                m["epochs_within_budget"],
                f"{best['val_acc']:.3f}" if best else None,
                best.get("epoch"),
                best.get("seconds"),
                m["epoch1_started_s"],
                m["first_epoch_s"],
            )
        )
    columns = ["method", "epochs", "best val acc", "at epoch", "at s", "epoch 1 start s"]
    lines = [
        results.table([*columns, "epoch 1 report s"], rows),
        "",
        goal_line(out),
        f"S={args.image_size}, batch {args.batch_size}, budget {args.budget_s:.0f} s per method "
        f"from launch, one after the other; {args.root.name}: train/ vs {args.val_split}/; "
        f"raycv epochs stamped when the bench saw them (polled every {budget.POLL_S:.0f} s)",
    ]
    return "\n".join(lines)


def goal_line(out: dict[str, dict[str, Any]]) -> str:
    claim = f"goal: raycv >= seed recipe + {GOAL * 100:.0f} points"
    return budget.beats_line(out, "val_acc", claim, "seed", GOAL)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.seed_recipe:
        seed_recipe(args)
        return 0
    goal = {"raycv_minus_seed_val_acc": GOAL}
    title = "Val accuracy in a wall-clock budget on real photos: raycv vs the seed recipe"
    out = budget.measure(args, run, "real_photos", goal, title, ("seed_recipe", "launched_at"))
    print(report(out, args))
    return 1 if any(m["error"] for m in out.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
