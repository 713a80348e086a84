"""Validation mIoU in a wall-clock budget on real photos with masks: raycv vs a plain PyTorch loop.

Both train the same model (``raycv.models.create_model`` with the config's ``model.name`` and
``model.encoder``, from scratch) on the same images and masks (by default the balloon photos in
``../shared/data/balloon``) at the same image size S and batch size, one after the other on the
same cores, each for ``--budget-s`` seconds counted from its command's launch, so Python
imports, data loading and start-up are part of what each pays:

* ``plain loop``: a script in the style of torchvision's ``references/segmentation``, run as a
  subprocess (this file with a hidden ``--plain-loop``): a ``Dataset`` that opens each photo and
  its mask with PIL every epoch, the references' train preset in ``transforms.v2`` (random
  resize of the shorter side to 0.5-2 x base size, horizontal flip, random crop S padded with
  255 in the mask, normalise), a shuffled ``DataLoader`` with ``--loader-workers`` processes,
  SGD (momentum 0.9, weight decay 1e-4, ``--plain-lr``) with the references' per-iteration poly
  schedule over ``--epochs``, cross-entropy ignoring 255 (plus 0.5 x the auxiliary head's, for
  torchvision models that have one); torch threads = the raycv workers' CPUs. After every epoch
  it scores the validation split and prints one JSON line, stamped with its own clock.
* ``raycv``: ``raycv train CONFIG data.mask_folder.root=... model.image_size=S
  train.batch_size=B train.epochs=E`` (``--config``, default ``configs/seg_folder.yaml``); the
  bench polls the run folder's ``metrics.jsonl`` every 2 s and stamps each epoch when it first
  sees it (so raycv's epochs carry up to 2 s of polling lag), then stops the run at the budget.

Both score validation the same way: every validation image resized whole to S x S (bilinear,
its mask nearest), one pixel confusion matrix over the split, mIoU = the mean IoU of the
classes present in truth or prediction (raycv's ``val_miou``). An epoch counts only if its
validation finished within the budget. The goal line checks raycv's best mIoU >= the plain
loop's. Run by hand, not in CI:

    python scripts/bench/real_masks.py                          # 2 x 10 min on balloon
    python scripts/bench/real_masks.py --budget-s 300 --epochs 35
    python scripts/bench/real_masks.py --budget-s 300 --epochs 60 --plain-epochs 100
    python scripts/bench/real_masks.py --root ~/data/seg --raycv-arg train.dice_weight=0
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
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
# Real photos with masks beside the checkout (../shared/data, see its README).
BALLOON = REPO.parent / "shared" / "data" / "balloon"
EXPERIMENT = "bench-real-masks"
# What the bench keeps of each raycv epoch (besides its stamps and every val_iou/<class>).
RAYCV_KEYS = ("epoch", "train_loss", "train_miou", "val_loss", "val_miou", "val_pixel_acc")
IGNORE = 255  # mask value left out of loss and metrics (raycv's data.ignore_index default)
BASE_OVER_CROP = 520 / 480  # the references' VOC recipe: base size 520, crop 480
AUX_WEIGHT = 0.5  # the references' auxiliary loss weight
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = results.parser(__file__, __doc__, "the full results (every epoch of both, the machine)")
    data = p.add_argument_group("data")
    data.add_argument(
        "--root",
        type=Path,
        default=BALLOON,
        help="folder holding <split>/images/*.jpg, <split>/masks/<stem>.png (class ids, 0 = "
        "background) and classes.txt (default: %(default)s)",
    )
    data.add_argument("--train-split", default="train", help="(default: %(default)s)")
    data.add_argument("--val-split", default="val", help="(default: %(default)s)")
    run = p.add_argument_group("measurement")
    run.add_argument(
        "--config",
        type=Path,
        default=REPO / "configs" / "seg_folder.yaml",
        help="raycv config the raycv run starts from; its model, image size, batch size, epochs "
        "and workers' CPUs are the plain loop's too (default: configs/seg_folder.yaml)",
    )
    run.add_argument("--image-size", type=int, help="S of both (default: the config's)")
    run.add_argument("--batch-size", type=int, help="batch size of both (default: the config's)")
    run.add_argument(
        "--epochs",
        type=int,
        help="schedule length of both: raycv's train.epochs, the plain loop's poly schedule "
        "(default: the config's train.epochs)",
    )
    run.add_argument(
        "--plain-epochs",
        type=int,
        help="the plain loop's schedule length when it differs, e.g. as many epochs as its "
        "faster epochs fit in the budget (default: --epochs)",
    )
    run.add_argument(
        "--budget-s",
        type=float,
        default=600,
        help="wall-clock seconds each method gets, from its command's launch (default 600)",
    )
    run.add_argument(
        "--plain-lr",
        type=float,
        default=0.02,
        help="the plain loop's SGD learning rate (default 0.02, the references' recipe)",
    )
    run.add_argument(
        "--loader-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="the plain loop's DataLoader worker processes "
        f"(default: os.cpu_count() = {os.cpu_count()})",
    )
    budget.add_method_options(run, ("plain", "raycv"))
    # The plain loop's own process: this file again, told when its command was launched.
    p.add_argument("--plain-loop", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--launched-at", type=float, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--encoder", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    budget.check_raycv_args(p, args)
    args.root = args.root.expanduser().resolve()
    if not args.plain_loop:
        fill_from_config(p, args)
    return args


def fill_from_config(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Options left unset take the config's values; every number must be positive; the
    folder must have the layout the plain loop reads (raycv finds more layouts)."""
    from raycv.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, [f"data.mask_folder.root={args.root}"])
    except (ConfigError, OSError, ValueError) as e:
        raise SystemExit(f"error: {args.config}: {e}") from e
    args.image_size = args.image_size or cfg.model.image_size
    args.batch_size = args.batch_size or cfg.train.batch_size
    args.epochs = args.epochs or cfg.train.epochs
    args.plain_epochs = args.plain_epochs or args.epochs
    args.model, args.encoder = cfg.model.name, cfg.model.encoder
    args.threads = max(1, round(cfg.scaling.cpus_per_worker * cfg.scaling.max_workers))
    numbers = ("image_size", "batch_size", "epochs", "plain_epochs", "budget_s", "plain_lr")
    for name in (*numbers, "loader_workers"):
        if getattr(args, name) < (0 if name == "loader_workers" else 1e-12):
            p.error(f"--{name.replace('_', '-')} is too small (got {getattr(args, name)})")
    for split in (args.train_split, args.val_split):
        for sub in ("images", "masks"):
            if not (args.root / split / sub).is_dir():
                raise SystemExit(
                    f"error: {args.root / split / sub} is not a folder: pass --root ROOT holding "
                    f"{split}/images/ and {split}/masks/ (the plain loop reads that layout)"
                )
    if not (args.root / "classes.txt").is_file():
        raise SystemExit(f"error: {args.root}/classes.txt is missing: one class name a line")


# ---------------------------------------------------------------- the plain loop (subprocess)


class MaskPairs:
    """``root/split/images/<stem>.*`` with ``root/split/masks/<stem>.png``: (Image, Mask)."""

    def __init__(self, root: Path, split: str, transform) -> None:
        masks = {m.stem: m for m in (root / split / "masks").glob("*.png")}
        images = sorted(f for f in (root / split / "images").iterdir() if f.stem in masks)
        if not images:
            raise SystemExit(f"error: no image in {root / split / 'images'} has a mask")
        self.pairs = [(f, masks[f.stem]) for f in images]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        from PIL import Image, ImageOps
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        image_path, mask_path = self.pairs[i]
        image = ImageOps.exif_transpose(Image.open(image_path)).convert("RGB")
        mask = tv_tensors.Mask(F.pil_to_tensor(Image.open(mask_path))[0])
        return self.transform(tv_tensors.Image(F.pil_to_tensor(image)), mask)


def train_preset(size: int):
    """The references' SegmentationPresetTrain (v2): random resize, flip, crop, normalise."""
    import torch
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    base = round(size * BASE_OVER_CROP)
    return v2.Compose(
        [
            v2.RandomResize(min_size=int(0.5 * base), max_size=int(2.0 * base)),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Mask: IGNORE, "others": 0}),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            v2.ToPureTensor(),
        ]
    )


def eval_preset(size: int):
    """The whole image resized to S x S (bilinear, antialiased), the mask nearest: what raycv's
    ``eval`` preset scores for segmentation."""
    import torch
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.Resize((size, size)),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            v2.ToPureTensor(),
        ]
    )


def plain_loop(args: argparse.Namespace) -> None:
    """Train until the budget (from --launched-at) is spent; one JSON line per finished epoch."""
    import torch

    from raycv.models import create_model

    deadline = args.launched_at + args.budget_s
    torch.set_num_threads(args.threads)
    classes = (args.root / "classes.txt").read_text().split()
    train_set = MaskPairs(args.root, args.train_split, train_preset(args.image_size))
    val_set = MaskPairs(args.root, args.val_split, eval_preset(args.image_size))
    loader = torch.utils.data.DataLoader
    workers = args.loader_workers
    kwargs = {"num_workers": workers, "persistent_workers": workers > 0}
    train = loader(train_set, args.batch_size, shuffle=True, drop_last=True, **kwargs)
    val = loader(val_set, args.batch_size, shuffle=False, **kwargs)
    torch.manual_seed(0)
    model = create_model(args.model, len(classes), image_size=args.image_size, encoder=args.encoder)
    optimizer = torch.optim.SGD(
        param_groups(model, args.plain_lr), lr=args.plain_lr, momentum=0.9, weight_decay=1e-4
    )
    steps = len(train) * args.epochs
    poly = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / steps) ** 0.9)
    for epoch in itertools.count(1):
        started = time.time() - args.launched_at
        fit = train_one_epoch(model, train, optimizer, poly, deadline)
        scores = evaluate(model, val, len(classes), deadline) if fit else None
        if scores is None:
            return  # the budget ran out inside this epoch: it does not count
        row = {"epoch": epoch, "seconds": time.time() - args.launched_at}
        row |= {"epoch_started_s": started, **fit, "lr": optimizer.param_groups[0]["lr"]}
        row |= {"val_miou": scores["miou"], "val_pixel_acc": scores["pixel_acc"]}
        row |= {f"val_iou/{c}": v for c, v in zip(classes, scores["iou"])}
        print(json.dumps(row), flush=True)
        if epoch >= args.epochs:
            return


def param_groups(model, lr: float) -> list[dict[str, Any]]:
    """As the references: an auxiliary head (torchvision's aux_classifier) learns at 10 x lr."""
    aux = getattr(model, "aux_classifier", None)
    if aux is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    in_aux = {id(p) for p in aux.parameters()}
    return [
        {"params": [p for p in model.parameters() if id(p) not in in_aux]},
        {"params": list(aux.parameters()), "lr": lr * 10},
    ]


def criterion(outputs, masks):
    import torch.nn.functional as F

    if not isinstance(outputs, dict):
        return F.cross_entropy(outputs, masks, ignore_index=IGNORE)
    loss = F.cross_entropy(outputs["out"], masks, ignore_index=IGNORE)
    if outputs.get("aux") is not None:
        loss = loss + AUX_WEIGHT * F.cross_entropy(outputs["aux"], masks, ignore_index=IGNORE)
    return loss


def train_one_epoch(model, loader, optimizer, scheduler, deadline: float) -> dict | None:
    """One pass; None once past the deadline (checked every batch, so the process stops at
    the budget, not an epoch later)."""
    model.train()
    loss_sum, seen, first_batch_s = 0.0, 0, None
    started = time.perf_counter()
    for images, masks in loader:
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - started
        if time.time() > deadline:
            return None
        loss = criterion(model(images), masks.long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item() * len(images)
        seen += len(images)
    return {"train_loss": loss_sum / seen, "first_batch_s": first_batch_s}


def evaluate(model, loader, num_classes: int, deadline: float) -> dict | None:
    """The pixel confusion matrix of the split -> mIoU as raycv's ``segmentation_scores``:
    classes in neither truth nor prediction are left out of the mean."""
    import torch

    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    with torch.inference_mode():
        for images, masks in loader:
            if time.time() > deadline:
                return None
            outputs = model(images)
            predicted = (outputs["out"] if isinstance(outputs, dict) else outputs).argmax(1)
            truth = masks.long()
            keep = truth != IGNORE
            cells = truth[keep] * num_classes + predicted[keep]
            confusion += torch.bincount(cells, minlength=num_classes**2).view_as(confusion)
    hits = confusion.diag().double()
    union = confusion.sum(0) + confusion.sum(1) - hits
    iou = hits / union  # NaN where a class is in neither
    return {
        "miou": iou.nanmean().nan_to_num(0.0).item(),
        "pixel_acc": (hits.sum() / confusion.sum().clamp(min=1)).item(),
        "iou": [None if math.isnan(v) else v for v in iou.tolist()],
    }


# ---------------------------------------------------------------- the two methods


def run_plain(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    launched = time.time()
    cmd = [sys.executable, __file__, "--plain-loop", f"--launched-at={launched!r}"]
    cmd += [f"--root={args.root}", f"--train-split={args.train_split}"]
    cmd += [f"--val-split={args.val_split}", f"--model={args.model}"]
    cmd += [f"--encoder={args.encoder}"] if args.encoder else []
    cmd += [f"--image-size={args.image_size}", f"--batch-size={args.batch_size}"]
    cmd += [f"--epochs={args.plain_epochs}", f"--budget-s={args.budget_s}"]
    cmd += [f"--plain-lr={args.plain_lr}", f"--loader-workers={args.loader_workers}"]
    cmd += [f"--threads={args.threads}"]
    lines = budget.JsonLines(logs / "stdout")
    watched = budget.watch(cmd, launched, args.budget_s, lines.poll, logs)
    error = budget.failed(watched, logs)
    return budget.summarise(cmd, lines.epochs, watched, error, args.budget_s, "val_miou")


def raycv_overrides(args: argparse.Namespace, storage: Path) -> list[str]:
    return [
        f"data.mask_folder.root={args.root}",
        f"data.mask_folder.train_split={args.train_split}",
        f"data.mask_folder.val_split={args.val_split}",
        f"model.image_size={args.image_size}",
        f"train.batch_size={args.batch_size}",
        f"train.epochs={args.epochs}",
        f"experiment={EXPERIMENT}",
        f"run.storage={storage}",
        *args.raycv_arg,
    ]


def run_raycv(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    storage = logs / "runs"
    cmd = budget.raycv_command(args.config, raycv_overrides(args, storage))
    launched = time.time()
    metrics = budget.RaycvMetrics(storage / EXPERIMENT, launched, RAYCV_KEYS, ("val_iou/",))
    watched = budget.watch(cmd, launched, args.budget_s, metrics.poll, logs)
    error = budget.failed(watched, logs)
    return budget.summarise(cmd, metrics.epochs, watched, error, args.budget_s, "val_miou")


def run(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, Any]]:
    return budget.run(args, tmp, {"plain": run_plain, "raycv": run_raycv})


def report(out: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    names = {"plain": "plain loop (references style)", "raycv": f"raycv ({args.config.name})"}
    classes = (args.root / "classes.txt").read_text().split()
    rows = []
    for key, m in out.items():
        best, last = m["best"] or {}, m["last"] or {}
        rows.append(
            (
                names[key] + (" FAILED" if m["error"] else ""),
                m["epochs_within_budget"],
                f"{best['val_miou']:.3f}" if best else None,
                *(budget.score(best.get(f"val_iou/{c}")) for c in classes[1:]),
                best.get("epoch"),
                best.get("seconds"),
                f"{last['val_miou']:.3f}" if last else None,
                m["epoch1_started_s"],
            )
        )
    columns = ["method", "epochs", "best val mIoU", *(f"IoU {c}" for c in classes[1:])]
    columns += ["at epoch", "at s", "last mIoU", "epoch 1 start s"]
    model = args.model + (f"/{args.encoder}" if args.encoder else "")
    scheduled = f"{args.epochs} epochs"
    if args.plain_epochs != args.epochs:
        scheduled = f"raycv {args.epochs} / plain loop {args.plain_epochs} epochs"
    lines = [
        results.table(columns, rows),
        "",
        goal_line(out),
        f"{model}, S={args.image_size}, batch {args.batch_size}, {scheduled} scheduled, "
        f"budget {args.budget_s:.0f} s per method from launch, one after the other; "
        f"{args.root.name}: {args.train_split}/ vs {args.val_split}/ scored whole at S x S; "
        f"raycv epochs stamped when the bench saw them (polled every {budget.POLL_S:.0f} s)",
    ]
    return "\n".join(lines)


def goal_line(out: dict[str, dict[str, Any]]) -> str:
    claim = "goal: raycv's best val mIoU >= the plain loop's"
    return budget.beats_line(out, "val_miou", claim, "plain")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plain_loop:
        plain_loop(args)
        return 0
    goal = {"raycv_minus_plain_val_miou": 0.0}
    title = "Val mIoU in a wall-clock budget on real photos with masks: raycv vs a plain loop"
    out = budget.measure(args, run, "real_masks", goal, title, ("plain_loop", "launched_at"))
    print(report(out, args))
    return 1 if any(m["error"] for m in out.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
