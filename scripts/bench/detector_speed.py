"""Detector images/s on the CPU: raycv's ``yolo_n`` and ``yolo_s`` against torchvision's
Faster R-CNN (MobileNetV3-Large 320 FPN) and SSDlite, training and evaluation.

Every model is built through ``raycv.models.create_model(name, num_classes, image_size=S)``
(random weights, nothing downloaded) and fed what raycv feeds it: a list of ImageNet-normalised
(3, S, S) images of rendered shapes (``medium``: one to three boxes each) with their boxes in
pixels, labels shifted by one for the models whose class 0 is background.

* ``train``: ``model(images, targets)``, the summed losses' backward and an SGD step.
* ``eval``: ``model(images)`` under ``torch.no_grad`` in evaluation mode: detections after
  each model's own post-processing (score threshold, NMS).

Each (model, size, mode) is timed ``--repeats`` times for ``--steps`` batches after one
untimed batch, the measurements interleaved (every model and size in turn, then again) so
that a burst of load hits them all; images/s is the median. SSDlite resizes every input to its
fixed 320 px inside, whatever S is. Run by hand:

    python scripts/bench/detector_speed.py                      # 64 and 128 px, ~3 min on 2 cores
    python scripts/bench/detector_speed.py --sizes 256 --models yolo_n,yolo_s --threads 4
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

import results

log = logging.getLogger("bench")

MODELS = "yolo_n,yolo_s,fasterrcnn_mobilenet_v3_large_320_fpn,ssdlite320_mobilenet_v3_large"
NUM_CLASSES = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = results.parser(__file__, __doc__, "every repeat of every measurement, with the machine")
    p.add_argument("--models", default=MODELS, help="comma-separated (default: %(default)s)")
    p.add_argument("--sizes", default="64,128", help="image sides S, comma-separated (64,128)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--steps", type=int, default=3, help="timed batches per measurement (3)")
    p.add_argument("--repeats", type=int, default=3, help="per measurement, interleaved (3)")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        p.error(f"--sizes takes comma-separated integers, e.g. 64,128 (got {args.sizes!r})")
    for name in ("batch_size", "threads", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def shapes_batch(size: int, count: int) -> tuple[list[Any], list[dict[str, Any]]]:
    """``count`` shapes at ``size`` px, normalised as raycv's presets leave them, and boxes."""
    import torch

    from raycv.config import IMAGENET_MEAN, IMAGENET_STD
    from raycv.data.decoders import padded_boxes
    from raycv.data.shapes import render

    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    images, targets = [], []
    for i in range(count):
        sample = render(i, image_size=size, num_classes=NUM_CLASSES, difficulty="medium", seed=0)
        pixels = torch.from_numpy(sample["image"]).permute(2, 0, 1).float() / 255
        images.append((pixels - mean) / std)
        boxes, labels = padded_boxes(sample, size, 10)
        real = labels >= 0
        targets.append(
            {"boxes": torch.from_numpy(boxes[real]), "labels": torch.from_numpy(labels[real])}
        )
    return images, targets


class Subject:
    """One model at one size, with its batch and optimizer, warmed up by one batch each way."""

    def __init__(self, name: str, size: int, batch_size: int) -> None:
        import torch

        from raycv.models import MODELS as REGISTRY
        from raycv.models import create_model

        torch.manual_seed(0)
        self.model = create_model(name, num_classes=NUM_CLASSES, image_size=size)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.images, targets = shapes_batch(size, batch_size)
        shift = int(REGISTRY.get(name).background_class)  # as raycv's detection task does
        self.targets = [{**t, "labels": t["labels"] + shift} for t in targets]
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.train_step()
        self.eval_step()

    def train_step(self) -> None:
        self.model.train()
        losses = self.model(self.images, self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        self.optimizer.step()

    def eval_step(self) -> None:
        import torch

        self.model.eval()
        with torch.no_grad():
            self.model(self.images)

    def images_per_s(self, mode: str, steps: int) -> float:
        step = self.train_step if mode == "train" else self.eval_step
        started = time.perf_counter()
        for _ in range(steps):
            step()
        return steps * len(self.images) / (time.perf_counter() - started)


def run(args: argparse.Namespace) -> dict[str, Any]:
    subjects = {}
    for size in args.sizes:
        for name in args.models:
            log.info("building %s at %d px", name, size)
            subjects[f"{name}@{size}"] = Subject(name, size, args.batch_size)
    runs: dict[str, dict[str, list[float]]] = {k: {"train": [], "eval": []} for k in subjects}
    for repeat in range(args.repeats):  # interleaved, so a burst of load hits every model
        for key, subject in subjects.items():
            for mode in ("train", "eval"):
                speed = subject.images_per_s(mode, args.steps)
                runs[key][mode].append(speed)
                log.info("repeat %d, %s %s: %.1f images/s", repeat + 1, key, mode, speed)
    out = {}
    for key, subject in subjects.items():
        name, size = key.rsplit("@", 1)
        out[key] = {
            "model": name,
            "image_size": int(size),
            "params": subject.params,
            **{f"{m}_repeats": r for m, r in runs[key].items()},
            **{f"{m}_images_per_s": results.median(r) for m, r in runs[key].items()},
        }
    return out


def report(out: dict[str, Any], args: argparse.Namespace) -> str:
    def spread(values: list[float]) -> str:
        return " ".join(f"{v:.1f}" for v in values)

    rows = [
        (
            r["model"],
            r["image_size"],
            f"{r['params'] / 1e6:.2f}",
            r["train_images_per_s"],
            r["eval_images_per_s"],
            spread(r["train_repeats"]),
            spread(r["eval_repeats"]),
        )
        for r in out.values()
    ]
    columns = [
        "model",
        "S",
        "params M",
        "train img/s",
        "eval img/s",
        "train repeats",
        "eval repeats",
    ]
    return "\n".join(
        [
            results.table(columns, rows),
            "",
            f"batch {args.batch_size}, {args.threads} torch thread(s), {NUM_CLASSES} classes; "
            f"median of {args.repeats} x {args.steps} batches; train = forward, loss, backward, "
            "SGD step; SSDlite works at 320 px inside whatever S is",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    results.setup_logging()
    torch.set_num_threads(args.threads)  # before the machine record, which reports it
    info = results.machine()
    out = run(args)
    info["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    record = {
        "benchmark": "detector_speed",
        "machine": info,
        "args": vars(args) | {"out": str(args.out)},
        "results": out,
    }
    print(results.header("Detector images/s on the CPU: yolo against torchvision's", info))
    print()
    print(report(out, args))
    results.write(args.out, record)


if __name__ == "__main__":
    main()
