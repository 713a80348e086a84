"""Val mAP@.5 in a wall-clock budget on real photos with boxes: raycv vs a plain PyTorch loop.

Both train the same detector (``raycv.models.create_model`` with the config's ``model.name``,
``model.encoder`` and ``model.weights``, from scratch by default: ``yolo_n`` over ResNet-18 for
``configs/det_folder.yaml``) on the same Pascal VOC folder (by default the kangaroo photos in
``../shared/data/kangaroo_voc``: ``ImageSets/Main/{train,val}.txt``) or COCO folder (``--root
../shared/data/balloon``: ``annotations/instances_{train,val}.json``) at the same image size S
and batch size, with as many torch threads (the raycv workers' CPUs), one after the other on
the same cores, each for ``--budget-s`` seconds counted from its command's launch, so Python
imports, data loading and start-up are part of what each pays:

* ``plain loop``: a script in the style of torchvision's ``references/detection``, run as a
  subprocess (this file with a hidden ``--plain-loop``): a ``Dataset`` that opens each JPEG
  with PIL and parses its VOC xml with ``xml.etree`` every epoch, or looks its boxes up in the
  COCO json read once (``difficult`` and ``iscrowd`` boxes left out of training; an image PIL
  cannot decode, such as kangaroo's truncated 00090.jpg, is skipped and counted in every
  epoch's ``skipped_unreadable``), the references' train preset in
  ``transforms.v2`` with ``tv_tensors.BoundingBoxes`` (``--plain-preset``: ``ssdlite``, the
  default, is ``RandomIoUCrop`` + horizontal flip; ``ssd`` adds photometric distortion and
  zoom-out; ``hflip`` is the flip alone), then the photo **letterboxed** to S x S (its long
  side resized to S, antialiased, centred on black), normalised, ``SanitizeBoundingBoxes``; a
  shuffled ``DataLoader`` with ``--loader-workers`` processes collating lists; **AdamW** (the
  references' ``--opt adamw``) at the config's learning rate and weight decay (``--plain-lr``,
  ``--plain-weight-decay``), no decay on norm and bias parameters (``--norm-weight-decay 0``,
  as raycv); a linear warm-up from 1/1000 over the config's ``scheduler.warmup_epochs``, then
  a cosine to 0 over ``--plain-epochs``, per iteration; the loss is the sum of
  ``model(images, targets)``'s parts. Class ids start at 0, shifted by one for models whose
  class 0 is background (the registry's ``background_class``), as raycv's detection task does.
  After every epoch it scores the validation split and prints one JSON line, stamped with its
  own clock.
* ``raycv``: ``raycv train CONFIG data.source=voc data.voc.root=... model.image_size=S
  train.batch_size=B train.epochs=E`` (``--config``, default ``configs/det_folder.yaml``); the
  bench polls the run folder's ``metrics.jsonl`` every 2 s and stamps each epoch when it first
  sees it (so raycv's epochs carry up to 2 s of polling lag), then stops the run at the budget.

Both score validation the same way as far as they can: the same images (the truncated one
skipped by both), the same boxes (VOC's 1-based minimums minus 1, clipped to the image),
``difficult`` and crowd boxes as ``iscrowd`` (neither counted nor penalised), every photo
letterboxed to S x S and scored in those pixels with torchmetrics'
``MeanAveragePrecision(box_format="xyxy", backend="faster_coco_eval")``: ``val_map50``
(mAP@.5) and ``val_map`` (mAP@[.5:.95]). What
differs is the pixels: raycv decodes each photo once, squeezed into a 1.15 x S working square,
and letterboxes that with one bilinear ``grid_sample`` (no antialiasing); the plain loop
resizes the decoded photo itself (antialiased). Training differs by design: raycv crops in the
photo's own proportions (scale 0.4-1, ratio 3/4-4/3, resized to S x S, so a crop is squeezed
by at most 4/3) with horizontal flips and colour jitter 0.2 on cached pixels; the plain loop's
crops come from the preset above, letterboxed. An epoch counts only if its validation finished
within the budget. The goal line checks raycv's best val mAP@.5 >= the plain loop's. Run by
hand, not in CI:

    python scripts/bench/real_boxes.py                           # 2 x 10 min on kangaroo_voc
    python scripts/bench/real_boxes.py --budget-s 300 --epochs 30
    python scripts/bench/real_boxes.py --plain-preset ssd --plain-epochs 80
    python scripts/bench/real_boxes.py --root ../shared/data/balloon   # COCO
    python scripts/bench/real_boxes.py --root ~/data/VOC2012 --raycv-arg model.name=yolo_s
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
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import budget
import results

log = logging.getLogger("bench")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# Real photos with boxes beside the checkout (../shared/data, see its README).
KANGAROO = REPO.parent / "shared" / "data" / "kangaroo_voc"
EXPERIMENT = "bench-real-boxes"
# What the bench keeps of each raycv epoch (besides its stamps and every val_ap/<class>).
RAYCV_KEYS = ("epoch", "train_loss", "lr", "val_map", "val_map50", "val_map75")
PRESETS = ("ssdlite", "ssd", "hflip")  # the references' DetectionPresetTrain that fit S x S
WARMUP_FACTOR = 1e-3  # the references' warm-up starts at lr / 1000
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
VOC_CORNERS = ("xmin", "ymin", "xmax", "ymax")
# What the plain loop's readers need of each format (VocBoxes, CocoBoxes).
LAYOUTS = {
    "voc": ("JPEGImages", "Annotations", "ImageSets/Main/{split}.txt"),
    "coco": ("annotations/instances_{split}.json", "{split}/images"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = results.parser(__file__, __doc__, "the full results (every epoch of both, the machine)")
    data = p.add_argument_group("data")
    data.add_argument(
        "--root",
        type=Path,
        default=KANGAROO,
        help="Pascal VOC folder holding JPEGImages/, Annotations/<stem>.xml and "
        "ImageSets/Main/<split>.txt, or COCO folder holding annotations/instances_<split>.json "
        "and <split>/images/ (default: %(default)s)",
    )
    data.add_argument(
        "--source",
        choices=tuple(LAYOUTS),
        help="the folder's format (default: coco if it holds annotations/, else voc)",
    )
    data.add_argument("--train-split", default="train", help="(default: %(default)s)")
    data.add_argument("--val-split", default="val", help="(default: %(default)s)")
    run = p.add_argument_group("measurement")
    run.add_argument(
        "--config",
        type=Path,
        default=REPO / "configs" / "det_folder.yaml",
        help="raycv config the raycv run starts from; its model, image size, batch size, "
        "epochs, optimizer, warm-up and workers' CPUs are the plain loop's too "
        "(default: configs/det_folder.yaml)",
    )
    run.add_argument(
        "--image-size",
        type=int,
        help="S of both, a multiple of 32 for yolo (default: the config's)",
    )
    run.add_argument("--batch-size", type=int, help="batch size of both (default: the config's)")
    run.add_argument(
        "--epochs",
        type=int,
        help="schedule length of both: raycv's train.epochs, the plain loop's cosine "
        "(default: the config's train.epochs)",
    )
    run.add_argument(
        "--plain-epochs",
        type=int,
        help="the plain loop's schedule length when it differs, e.g. as many as its faster "
        "epochs fit in the budget (default: --epochs)",
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
        help="the plain loop's AdamW learning rate (default: the config's)",
    )
    run.add_argument(
        "--plain-weight-decay",
        type=float,
        help="the plain loop's AdamW weight decay (default: the config's)",
    )
    run.add_argument(
        "--plain-preset",
        choices=PRESETS,
        default="ssdlite",
        help="the plain loop's references train preset before letterboxing: ssdlite = "
        "RandomIoUCrop + flip, ssd = photometric distortion + zoom-out + RandomIoUCrop + "
        "flip, hflip = flip alone (default: %(default)s)",
    )
    run.add_argument(
        "--loader-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="the plain loop's DataLoader worker processes "
        f"(default: os.cpu_count() = {os.cpu_count()})",
    )
    run.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the seed of both: the plain loop's torch generator (its weights, shuffling and "
        "augmentation) and raycv's seed (default 0)",
    )
    budget.add_method_options(run, ("plain", "raycv"))
    # The plain loop's own process: this file again, told when its command was launched.
    p.add_argument("--plain-loop", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--launched-at", type=float, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--encoder", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--classes", help=argparse.SUPPRESS)
    p.add_argument("--warmup-epochs", type=float, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    budget.check_raycv_args(p, args)
    args.root = args.root.expanduser().resolve()
    args.source = args.source or ("coco" if (args.root / "annotations").is_dir() else "voc")
    if not args.plain_loop:
        fill_from_config(p, args)
    return args


def source_overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"data.source={args.source}",
        f"data.{args.source}.root={args.root}",
        f"data.{args.source}.train_split={args.train_split}",
        f"data.{args.source}.val_split={args.val_split}",
    ]


def fill_from_config(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Options left unset take the config's values; every number must be positive; the
    folder must have the layout the plain loop reads."""
    from raycv.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, source_overrides(args))
    except (ConfigError, OSError, ValueError) as e:
        raise SystemExit(f"error: {args.config}: {e}") from e
    args.image_size = args.image_size or cfg.model.image_size
    args.batch_size = args.batch_size or cfg.train.batch_size
    args.epochs = args.epochs or cfg.train.epochs
    args.plain_epochs = args.plain_epochs or args.epochs
    args.plain_lr = args.plain_lr if args.plain_lr is not None else cfg.optimizer.lr
    wd = args.plain_weight_decay
    args.plain_weight_decay = wd if wd is not None else cfg.optimizer.weight_decay
    args.model, args.encoder, args.weights = cfg.model.name, cfg.model.encoder, cfg.model.weights
    classes = getattr(cfg.data, args.source).classes
    args.classes = ",".join(classes) if classes else None
    args.warmup_epochs = cfg.scheduler.warmup_epochs
    args.threads = max(1, round(cfg.scaling.cpus_per_worker * cfg.scaling.max_workers))
    numbers = ("image_size", "batch_size", "epochs", "plain_epochs", "budget_s", "plain_lr")
    for name in (*numbers, "loader_workers", "plain_weight_decay"):
        if getattr(args, name) < (0 if name in ("loader_workers", "plain_weight_decay") else 1e-12):
            p.error(f"--{name.replace('_', '-')} is too small (got {getattr(args, name)})")
    for split in (args.train_split, args.val_split):
        for needed in LAYOUTS[args.source]:
            path = args.root / needed.format(split=split)
            if not path.exists():
                raise SystemExit(
                    f"error: {path} is missing: pass --root holding "
                    f"{', '.join(LAYOUTS[args.source]).replace('{split}', '<split>')} "
                    f"({args.source}), or --train-split / --val-split"
                )


# ---------------------------------------------------------------- the plain loop (subprocess)


def split_stems(root: Path, split: str) -> list[str]:
    text = (root / "ImageSets" / "Main" / f"{split}.txt").read_text(encoding="utf-8-sig")
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def coco_json(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}.json"


def class_names(root: Path, source: str, splits: tuple[str, ...]) -> list[str]:
    """As raycv's readers: COCO's categories in id order; VOC's every ``<name>`` annotated in
    the splits, sorted."""
    if source == "coco":
        categories = json.loads(coco_json(root, splits[0]).read_text())["categories"]
        return [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
    names = set()
    for split in splits:
        for stem in split_stems(root, split):
            xml = root / "Annotations" / f"{stem}.xml"
            if xml.is_file():
                names |= {o.findtext("name").strip() for o in ET.parse(xml).iter("object")}
    return sorted(names)


class PhotoBoxes:
    """A split's images with their boxes: (Image, {"boxes": BoundingBoxes, "labels",
    "iscrowd"}), or None for an image PIL cannot decode (skipped and counted by ``collate``).
    Boxes to ignore (VOC's ``difficult``, COCO's ``iscrowd``) are left out
    (``keep_ignored`` False: training) or kept as ``iscrowd`` 1 (validation). Subclasses
    list ``self.items`` and give each item's objects as (class name, x0, y0, x1, y1 pixel
    edges, ignored)."""

    def __init__(self, classes: list[str], transform, keep_ignored: bool) -> None:
        self.ids = {name: i for i, name in enumerate(classes)}
        self.transform, self.keep_ignored = transform, keep_ignored
        self.items: list = []

    def objects(self, i: int) -> list[tuple[str, float, float, float, float, bool]]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        import torch
        from PIL import Image, ImageOps
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        try:
            image = ImageOps.exif_transpose(Image.open(self.items[i][0])).convert("RGB")
        except OSError:  # truncated or not an image: the references would crash; skip it
            return None
        width, height = image.size
        boxes, labels, crowd = [], [], []
        for name, x0, y0, x1, y1, ignored in self.objects(i):
            if name not in self.ids or (ignored and not self.keep_ignored):
                continue
            box = [max(0.0, x0), max(0.0, y0), min(width, x1), min(height, y1)]
            if box[2] > box[0] and box[3] > box[1]:
                boxes.append(box)
                labels.append(self.ids[name])
                crowd.append(int(ignored))
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                format="XYXY",
                canvas_size=(height, width),
            ),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
        if self.keep_ignored:  # validation: what the metric leaves out (training: none)
            target["iscrowd"] = torch.tensor(crowd, dtype=torch.int64)
        return self.transform(tv_tensors.Image(F.pil_to_tensor(image)), target)


class VocBoxes(PhotoBoxes):
    """``ImageSets/Main/<split>.txt``'s images; each xml parsed every time it is read, as the
    references' VOC dataset does."""

    def __init__(self, root: Path, split: str, classes: list[str], transform, keep: bool) -> None:
        super().__init__(classes, transform, keep)
        images = {f.stem: f for f in (root / "JPEGImages").iterdir()}
        images = {s: f for s, f in images.items() if f.suffix.lower() in IMAGE_SUFFIXES}
        self.items = [
            (images[s], root / "Annotations" / f"{s}.xml")
            for s in split_stems(root, split)
            if s in images and (root / "Annotations" / f"{s}.xml").is_file()
        ]
        if not self.items:
            raise SystemExit(f"error: no image of {split}.txt has both a JPEG and an xml")

    def objects(self, i: int) -> list[tuple[str, float, float, float, float, bool]]:
        found = []
        for obj in ET.parse(self.items[i][1]).iter("object"):
            x0, y0, x1, y1 = (float(obj.findtext(f"bndbox/{k}")) for k in VOC_CORNERS)
            # 1-based inclusive corners -> pixel edges, as raycv's reader (and detectron2's).
            ignored = (obj.findtext("difficult") or "0").strip() == "1"
            found.append(((obj.findtext("name") or "").strip(), x0 - 1, y0 - 1, x1, y1, ignored))
        return found


class CocoBoxes(PhotoBoxes):
    """``annotations/instances_<split>.json`` (read once, as the references' CocoDetection
    does), images in ``<split>/images/``; boxes xywh; ``iscrowd`` boxes ignored."""

    def __init__(self, root: Path, split: str, classes: list[str], transform, keep: bool) -> None:
        super().__init__(classes, transform, keep)
        data = json.loads(coco_json(root, split).read_text())
        names = {c["id"]: c["name"] for c in data["categories"]}
        by_image: dict[Any, list] = {image["id"]: [] for image in data["images"]}
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            crowd = bool(a.get("iscrowd", 0))
            by_image[a["image_id"]].append((names[a["category_id"]], x, y, x + w, y + h, crowd))
        folder = root / split / "images"
        self.items = [
            (folder / image["file_name"], by_image[image["id"]]) for image in data["images"]
        ]

    def objects(self, i: int) -> list[tuple[str, float, float, float, float, bool]]:
        return self.items[i][1]


READERS = {"voc": VocBoxes, "coco": CocoBoxes}


def collate(batch: list) -> tuple[list, list, int]:
    """Lists, as the references' ``collate_fn``; unreadable images dropped and counted."""
    kept = [sample for sample in batch if sample is not None]
    return [s[0] for s in kept], [s[1] for s in kept], len(batch) - len(kept)


def letterbox(size: int) -> list:
    """The long side resized to S (antialiased), centred in S x S on black, then normalised:
    the pixels of raycv's ``eval`` preset for a photo."""
    import torch
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    return [
        v2.Resize(size=None, max_size=size),
        v2.CenterCrop(size),  # pads the short side with zeros, boxes moved with it
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]


def train_preset(size: int, preset: str):
    """The references' DetectionPresetTrain (v2) for ``preset``, letterboxed to S."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    augment = {
        "hflip": [v2.RandomHorizontalFlip(0.5)],
        "ssdlite": [v2.RandomIoUCrop(), v2.RandomHorizontalFlip(0.5)],
        "ssd": [
            v2.RandomPhotometricDistort(),
            v2.RandomZoomOut(fill={tv_tensors.Image: (123, 117, 104), "others": 0}),
            v2.RandomIoUCrop(),
            v2.RandomHorizontalFlip(0.5),
        ],
    }[preset]
    return v2.Compose([*augment, *letterbox(size), v2.SanitizeBoundingBoxes(), v2.ToPureTensor()])


def eval_preset(size: int):
    from torchvision.transforms import v2

    return v2.Compose([*letterbox(size), v2.ToPureTensor()])


def plain_loop(args: argparse.Namespace) -> None:
    """Train until the budget (from --launched-at) is spent; one JSON line per finished epoch."""
    import torch

    from raycv.models import MODELS, create_model

    deadline = args.launched_at + args.budget_s
    torch.set_num_threads(args.threads)
    splits = (args.train_split, args.val_split)
    classes = (
        args.classes.split(",") if args.classes else class_names(args.root, args.source, splits)
    )
    reader = READERS[args.source]
    preset = train_preset(args.image_size, args.plain_preset)
    train_set = reader(args.root, args.train_split, classes, preset, keep=False)
    val_set = reader(args.root, args.val_split, classes, eval_preset(args.image_size), keep=True)
    loader = torch.utils.data.DataLoader
    workers = args.loader_workers
    kwargs = {"num_workers": workers, "persistent_workers": workers > 0, "collate_fn": collate}
    train = loader(train_set, args.batch_size, shuffle=True, drop_last=True, **kwargs)
    val = loader(val_set, args.batch_size, shuffle=False, **kwargs)
    torch.manual_seed(args.seed)
    model = create_model(
        args.model, len(classes), args.weights, args.image_size, encoder=args.encoder
    )
    shift = int(MODELS.get(args.model).background_class)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.plain_lr, weight_decay=args.plain_weight_decay)
    schedule = warmup_cosine(len(train) * args.plain_epochs, len(train) * args.warmup_epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    for epoch in itertools.count(1):
        started = time.time() - args.launched_at
        fit = train_one_epoch(model, train, optimizer, scheduler, shift, deadline)
        scores = evaluate(model, val, shift, deadline) if fit else None
        if scores is None:
            return  # the budget ran out inside this epoch: it does not count
        skipped = fit.pop("skipped") + scores.pop("skipped")
        row = {"epoch": epoch, "seconds": time.time() - args.launched_at}
        row |= {"epoch_started_s": started, **fit, "lr": optimizer.param_groups[0]["lr"]}
        row |= {**scores, "skipped_unreadable": skipped}
        print(json.dumps(row), flush=True)
        if epoch >= args.plain_epochs:
            return


def warmup_cosine(steps: int, warmup: float):
    """Per-iteration factor: linear from WARMUP_FACTOR to 1 over ``warmup`` steps, then a
    cosine to 0 at ``steps``."""
    warmup = int(warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return WARMUP_FACTOR + (1 - WARMUP_FACTOR) * step / warmup
        done = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * done))

    return factor


def train_one_epoch(model, loader, optimizer, scheduler, shift: int, deadline: float):
    """One pass; None once past the deadline (checked every batch, so the process stops at
    the budget, not an epoch later)."""
    model.train()
    loss_sum, steps, skipped, first_batch_s = 0.0, 0, 0, None
    started = time.perf_counter()
    for images, targets, bad in loader:
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - started
        if time.time() > deadline:
            return None
        skipped += bad
        targets = [{"boxes": t["boxes"], "labels": t["labels"] + shift} for t in targets]
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item()
        steps += 1
    return {
        "train_loss": loss_sum / max(steps, 1),
        "first_batch_s": first_batch_s,
        "skipped": skipped,
    }


def evaluate(model, loader, shift: int, deadline: float) -> dict | None:
    """COCO box mAP of the split, as raycv's ``detection_metrics.coco_map`` computes it."""
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
    model.eval()
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval")
    skipped = 0
    with torch.inference_mode():
        for images, targets, bad in loader:
            if time.time() > deadline:
                return None
            skipped += bad
            if not images:
                continue
            found = model(images)
            keys = ("boxes", "scores", "labels")
            found = [{k: d[k] if k != "labels" else d[k] - shift for k in keys} for d in found]
            metric.update(found, targets)
    scores = metric.compute()
    return {
        "val_map": float(scores["map"]),
        "val_map50": float(scores["map_50"]),
        "val_map75": float(scores["map_75"]),
        "skipped": skipped,
    }


# ---------------------------------------------------------------- the two methods


def run_plain(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    launched = time.time()
    cmd = [sys.executable, __file__, "--plain-loop", f"--launched-at={launched!r}"]
    cmd += [f"--root={args.root}", f"--source={args.source}"]
    cmd += [f"--train-split={args.train_split}"]
    cmd += [f"--val-split={args.val_split}", f"--model={args.model}"]
    cmd += [f"--encoder={args.encoder}"] if args.encoder else []
    cmd += [f"--weights={args.weights}"] if args.weights else []
    cmd += [f"--classes={args.classes}"] if args.classes else []
    cmd += [f"--image-size={args.image_size}", f"--batch-size={args.batch_size}"]
    cmd += [f"--epochs={args.epochs}", f"--plain-epochs={args.plain_epochs}"]
    cmd += [f"--budget-s={args.budget_s}", f"--plain-lr={args.plain_lr}"]
    cmd += [f"--plain-weight-decay={args.plain_weight_decay}"]
    cmd += [f"--plain-preset={args.plain_preset}", f"--warmup-epochs={args.warmup_epochs}"]
    cmd += [f"--loader-workers={args.loader_workers}", f"--threads={args.threads}"]
    cmd += [f"--seed={args.seed}"]
    lines = budget.JsonLines(logs / "stdout")
    watched = budget.watch(cmd, launched, args.budget_s, lines.poll, logs)
    error = budget.failed(watched, logs)
    out = budget.summarise(cmd, lines.epochs, watched, error, args.budget_s, "val_map50")
    return out | {"skipped_unreadable": (out["last"] or {}).get("skipped_unreadable")}


def raycv_overrides(args: argparse.Namespace, storage: Path) -> list[str]:
    return [
        *source_overrides(args),
        f"model.image_size={args.image_size}",
        f"train.batch_size={args.batch_size}",
        f"train.epochs={args.epochs}",
        f"experiment={EXPERIMENT}",
        f"run.storage={storage}",
        f"seed={args.seed}",
        *args.raycv_arg,
    ]


def run_raycv(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    storage = logs / "runs"
    cmd = budget.raycv_command(args.config, raycv_overrides(args, storage))
    launched = time.time()
    metrics = budget.RaycvMetrics(storage / EXPERIMENT, launched, RAYCV_KEYS, ("val_ap/",))
    watched = budget.watch(cmd, launched, args.budget_s, metrics.poll, logs)
    error = budget.failed(watched, logs)
    out = budget.summarise(cmd, metrics.epochs, watched, error, args.budget_s, "val_map50")
    return out | {"skipped_unreadable": skipped_files(logs)}


def skipped_files(logs: Path) -> int | None:
    """raycv's count of unreadable files, from its log line ``N unreadable files skipped``."""
    for line in (logs / "stderr").read_text().splitlines():
        if "unreadable files skipped" in line:
            words = line.split("unreadable files skipped")[0].split()
            return int(words[-1]) if words and words[-1].isdigit() else None
    return None


def run(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, Any]]:
    return budget.run(args, tmp, {"plain": run_plain, "raycv": run_raycv})


def report(out: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    names = {
        "plain": f"plain loop (references, {args.plain_preset})",
        "raycv": f"raycv ({args.config.name})",
    }
    rows = []
    for key, m in out.items():
        best, last = m["best"] or {}, m["last"] or {}
        scored = [
            e for e in m["epochs"] if e["seconds"] <= args.budget_s and e.get("val_map") is not None
        ]
        best_map = max((e["val_map"] for e in scored), default=None)
        rows.append(
            (
                names[key] + (" FAILED" if m["error"] else ""),
                m["epochs_within_budget"],
                budget.score(best.get("val_map50")),
                budget.score(best.get("val_map")),
                best.get("epoch"),
                best.get("seconds"),
                budget.score(best_map),
                budget.score(last.get("val_map50")),
                m["epoch1_started_s"],
                m["skipped_unreadable"],
            )
        )
    columns = ["method", "epochs", "best mAP@.5", "its mAP@[.5:.95]", "at epoch", "at s"]
    columns += ["best mAP@[.5:.95]", "last mAP@.5", "epoch 1 start s", "unreadable"]
    model = args.model + (f"/{args.encoder}" if args.encoder else "")
    scheduled = f"{args.epochs} epochs"
    if args.plain_epochs != args.epochs:
        scheduled = f"raycv {args.epochs} / plain loop {args.plain_epochs} epochs"
    lines = [
        results.table(columns, rows),
        "",
        goal_line(out),
        f"{model}{' ' + args.weights if args.weights else ''}, S={args.image_size}, "
        f"batch {args.batch_size}, {scheduled} scheduled, budget {args.budget_s:.0f} s per "
        f"method from launch, one after the other; {args.root.name}: {args.train_split} vs "
        f"{args.val_split}, letterboxed to S x S, COCO mAP (faster_coco_eval); raycv epochs "
        f"stamped when the bench saw them (polled every {budget.POLL_S:.0f} s)",
    ]
    return "\n".join(lines)


def goal_line(out: dict[str, dict[str, Any]]) -> str:
    claim = "goal: raycv's best val mAP@.5 >= the plain loop's"
    return budget.beats_line(out, "val_map50", claim, "plain")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plain_loop:
        plain_loop(args)
        return 0
    goal = {"raycv_minus_plain_val_map50": 0.0}
    title = "Val mAP@.5 in a wall-clock budget on real photos with boxes: raycv vs a plain loop"
    out = budget.measure(args, run, "real_boxes", goal, title, ("plain_loop", "launched_at"))
    print(report(out, args))
    return 1 if any(m["error"] for m in out.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
