"""Box-aware augmentation images/s: raycv's fused classic preset vs torchvision v2 per sample.

Both augment the same cached uint8 images with their boxes (xyxy pixels, padded to
``--max-boxes`` rows as raycv caches them, label -1 for padding), in this process, on the same
threads, with the same recipe (flips, rotation, random resized crop, colour jitter, normalise;
parameters from raycv's ``augment`` defaults), and hand back the same padded batch:

* ``raycv classic``: one affine matrix per image, one ``grid_sample`` for the batch's pixels;
  each image's boxes move through its own matrix (``transform_boxes``: the box around the four
  moved corners, clipped; a box with under a quarter of its area left is dropped).
* ``torchvision v2``: raycv's ``classic_v2`` pipeline ending in ``ClampBoundingBoxes`` and
  ``SanitizeBoundingBoxes`` (torchvision's detection references end in the latter), called once
  per sample on the image and a target ``{"boxes": tv_tensors.BoundingBoxes (XYXY), "labels":
  ...}`` (the only way v2 draws per image).

The same two run once more on the images alone (``classic`` and ``classic_v2``), to show what
carrying boxes costs.  Each is timed ``--repeats`` times for ``--seconds``, interleaved;
images/s is the median.  Run by hand:

    python scripts/bench/box_augment.py                       # shapes, 256 px cached -> 224
    python scripts/bench/box_augment.py --photos              # the kangaroo photos and boxes
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import results

log = logging.getLogger("bench")

GOAL = 2.0  # raycv classic vs torchvision v2, with boxes
# Real photos with VOC boxes beside the checkout (../shared/data, see its README).
KANGAROO = Path(__file__).resolve().parents[3] / "shared" / "data" / "kangaroo_voc"
# What a sample carries beside its boxes, moved (or dropped) with them.
BOX_COLUMNS = ("labels", "crowd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from raycv.config import DataConfig

    p = results.parser(__file__, __doc__, "every repeat of every method, with the machine")
    data = p.add_argument_group("data")
    data.add_argument(
        "--photos",
        type=Path,
        nargs="?",
        const=KANGAROO,
        help="a Pascal VOC folder (Annotations/*.xml, JPEGImages/, ImageSets/Main/{train,val}"
        f".txt) to augment instead of rendered shapes; alone: {KANGAROO}",
    )
    data.add_argument(
        "--num-images",
        type=int,
        default=256,
        help="shapes rendered, or photos read at most (default 256); batches cycle over them",
    )
    data.add_argument(
        "--working-size",
        type=int,
        default=256,
        help="side of the cached square images (default 256)",
    )
    data.add_argument(
        "--max-boxes",
        type=int,
        default=DataConfig.model_fields["max_boxes"].default,
        help="rows each image's boxes are padded to, as data.max_boxes (default %(default)s)",
    )
    run = p.add_argument_group("measurement")
    run.add_argument("--image-size", type=int, default=224, help="output side S (default 224)")
    run.add_argument("--batch-size", type=int, default=32, help="images per call (default 32)")
    run.add_argument(
        "--threads", type=int, default=1, help="torch threads for every method (default 1)"
    )
    run.add_argument("--seconds", type=float, default=3.0, help="per measurement (default 3)")
    run.add_argument("--repeats", type=int, default=3, help="per method, interleaved (default 3)")
    args = p.parse_args(argv)
    for name in (
        "num_images",
        "working_size",
        "max_boxes",
        "image_size",
        "batch_size",
        "threads",
        "repeats",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# ---------------------------------------------------------------- the cached images


def rendered_shapes(count: int, size: int, max_boxes: int) -> dict[str, np.ndarray]:
    """Shapes (medium: distractors of other classes) with their boxes, padded as raycv's
    ``shapes`` source caches them (``padded_boxes``)."""
    from raycv.data import shapes
    from raycv.data.decoders import padded_boxes

    images, boxes, labels = [], [], []
    for index in range(count):
        sample = shapes.render(index, image_size=size, num_classes=6, difficulty="medium", seed=0)
        b, lab = padded_boxes(sample, size, max_boxes)
        images.append(sample["image"])
        boxes.append(b)
        labels.append(lab)
    return {"image": np.stack(images), "boxes": np.stack(boxes), "labels": np.stack(labels)}


def cached_photos(folder: Path, count: int, size: int, max_boxes: int) -> dict[str, np.ndarray]:
    """Photos of both splits read by raycv's VOC reader and decoded by its ``voc`` source's
    batch function: squeezed whole into size x size, boxes scaled alike, with the ``aspect``
    that undoes the squeeze and the ``crowd`` (VOC difficult) flags. Unreadable photos are
    left out, as the source skips them."""
    import pyarrow.fs as pafs

    from raycv.data.box_formats import read_voc
    from raycv.data.decoders import DecodeBoxes

    if not (folder / "Annotations").is_dir():
        raise SystemExit(f"error: no {folder / 'Annotations'}: pass --photos DIR, a VOC folder")
    fs = pafs.LocalFileSystem()
    found = read_voc(fs, str(folder), splits=("train", "val"))
    records = [r for split in found.splits.values() for r in split][:count]
    n = len(records)
    boxes = np.zeros((n, max_boxes, 4), np.float32)
    labels = np.full((n, max_boxes), -1, np.int64)
    crowd = np.zeros((n, max_boxes), bool)
    for i, r in enumerate(records):
        k = min(len(r.labels), max_boxes)
        boxes[i, :k], labels[i, :k], crowd[i, :k] = r.boxes[:k], r.labels[:k], r.ignore[:k]
    decoded = DecodeBoxes(fs, size)(
        {
            "path": np.array([r.image for r in records], dtype=object),
            "size": np.array([(r.width, r.height) for r in records], np.int64),
            "boxes": boxes,
            "labels": labels,
            "crowd": crowd,
        }
    )
    good = decoded["error"] == ""
    for error in decoded["error"][~good]:
        log.warning("skipped %s", error)
    columns = ("image", "boxes", "labels", "crowd", "aspect")
    return {c: np.asarray(decoded[c])[good] for c in columns}


# ---------------------------------------------------------------- torchvision v2 with boxes


def _box_columns(inputs: Any) -> tuple:
    """SanitizeBoundingBoxes' ``labels_getter``: every tensor of the target beside its boxes."""
    return tuple(v for k, v in inputs[1].items() if k != "boxes")


class V2Boxes:
    """raycv's ``classic_v2`` pipeline + ``SanitizeBoundingBoxes``, called once per sample on
    ``(image, {"boxes": BoundingBoxes, "labels": ..., "crowd": ...})``; the batch comes back
    as raycv's preset packs it (padded boxes, label -1 for rows dropped).  A squeezed photo
    (``aspect``) is first resized back to its own proportions with its boxes, as ``classic_v2``
    does with images and masks."""

    def __init__(self, cfg, image_size: int) -> None:
        from torchvision.transforms import v2

        from raycv.data.augment import build_preset

        reference = build_preset("classic_v2", cfg, image_size).pipeline
        # Clamp first, as SanitizeBoundingBoxes' docs advise: resizing the crop leaves a box
        # cut at its edge a rounding error past it (224.000015), which Sanitize would drop.
        clamp = v2.ClampBoundingBoxes()
        sanitize = v2.SanitizeBoundingBoxes(labels_getter=_box_columns)
        self.pipeline = v2.Compose([*reference.transforms, clamp, sanitize])
        self.image_size = image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        from raycv.data.augment import true_sides

        images = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"]))
        images = images.permute(0, 3, 1, 2)
        n, _, height, width = images.shape
        size, k = self.image_size, batch["labels"].shape[1]
        extras = [c for c in BOX_COLUMNS if c in batch]
        out = {
            "image": np.empty((n, 3, size, size), np.uint8),  # as raycv's presets hand it on
            "boxes": np.zeros((n, k, 4), np.float32),
            **{c: np.zeros_like(batch[c]) for c in extras},
        }
        out["labels"][:] = -1
        sides = zip(*true_sides(batch.get("aspect"), n, height, width))
        for i, (image, (h, w)) in enumerate(zip(images, sides)):
            real = batch["labels"][i] >= 0
            boxes = tv_tensors.BoundingBoxes(
                torch.from_numpy(batch["boxes"][i][real]),
                format="XYXY",
                canvas_size=(height, width),
            )
            own = [round(h), round(w)]
            if own != [height, width]:
                image, boxes = F.resize(image, own), F.resize(boxes, own)
            target = {"boxes": boxes, **{c: torch.from_numpy(batch[c][i][real]) for c in extras}}
            image, target = self.pipeline(image, target)
            out["image"][i] = image.mul(255).round_().to(torch.uint8).numpy()
            kept = len(target["boxes"])
            out["boxes"][i, :kept] = target["boxes"].numpy()
            for c in extras:
                out[c][i, :kept] = target[c].numpy()
        return {**batch, **out}


# ---------------------------------------------------------------- timing


def throughput(preset, cache: dict[str, np.ndarray], batch_size: int, seconds: float) -> float:
    """Images/s of ``preset`` on batches cycling over ``cache``, after one warm-up batch."""
    count = len(cache["image"])
    starts = range(0, count, batch_size)
    batches = [{key: values[s : s + batch_size] for key, values in cache.items()} for s in starts]
    preset(batches[0])
    images, k, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        images += len(preset(batches[k % len(batches)])["image"])
        k += 1
    return images / (time.perf_counter() - started)


def boxes_kept(preset, cache: dict[str, np.ndarray], batch_size: int) -> float:
    """Share of the real boxes that one augmented pass over ``cache`` keeps."""
    before = after = 0
    for s in range(0, len(cache["image"]), batch_size):
        batch = {key: values[s : s + batch_size] for key, values in cache.items()}
        before += int((batch["labels"] >= 0).sum())
        after += int((preset(batch)["labels"] >= 0).sum())
    return after / before if before else float("nan")


def run(cache: dict[str, np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    from raycv.config import AugmentConfig
    from raycv.data.augment import build_preset

    cfg = AugmentConfig()
    images_only = {k: v for k, v in cache.items() if k not in ("boxes", *BOX_COLUMNS)}
    methods = {
        "classic_boxes": (build_preset("classic", cfg, args.image_size), cache),
        "v2_boxes": (V2Boxes(cfg, args.image_size), cache),
        "classic_images": (build_preset("classic", cfg, args.image_size), images_only),
        "v2_images": (build_preset("classic_v2", cfg, args.image_size), images_only),
    }
    runs: dict[str, list[float]] = {name: [] for name in methods}
    for repeat in range(args.repeats):  # interleaved, so a burst of load hits every method
        for name, (preset, data) in methods.items():
            speed = throughput(preset, data, args.batch_size, args.seconds)
            runs[name].append(speed)
            log.info("repeat %d, %s: %.0f images/s", repeat + 1, name, speed)
    out = {name: {"repeats": r, "images_per_s": results.median(r)} for name, r in runs.items()}
    for what in ("boxes", "images"):
        out[f"classic_{what}"]["vs_v2"] = results.ratio(
            out[f"classic_{what}"]["images_per_s"], out[f"v2_{what}"]["images_per_s"]
        )
    for name in ("classic_boxes", "v2_boxes"):  # a sanity check, not timed
        out[name]["boxes_kept"] = boxes_kept(methods[name][0], cache, args.batch_size)
    boxes = int((cache["labels"] >= 0).sum())
    return {"methods": out, "boxes": boxes, "augment": cfg.model_dump(mode="json")}


def report(out: dict[str, Any], args: argparse.Namespace, data: str) -> str:
    m = out["methods"]

    def row(label: str, name: str) -> tuple:
        repeats = " ".join(f"{v:.0f}" for v in m[name]["repeats"])
        kept = m[name].get("boxes_kept")
        kept = "-" if kept is None else f"{100 * kept:.0f} %"
        return (label, m[name]["images_per_s"], m[name].get("vs_v2", 1.0), kept, repeats)

    rows = [
        row("raycv classic: fused warp, images + boxes", "classic_boxes"),
        row("torchvision v2 per sample, Image + BoundingBoxes", "v2_boxes"),
        row("raycv classic: images alone", "classic_images"),
        row("torchvision v2 per sample: images alone", "v2_images"),
    ]
    got = m["classic_boxes"]["vs_v2"] or 0.0
    verdict = "met" if got >= GOAL else "NOT met"
    columns = ["method", "images/s", "vs v2 (same inputs)", "boxes kept", "per repeat"]
    return "\n".join(
        [
            results.table(columns, rows),
            "",
            f"goal: raycv classic with boxes >= {GOAL:.0f}x torchvision v2: {verdict} ({got:.2f}x)",
            f"{data} ({out['boxes']} boxes, padded to {args.max_boxes}), cached at "
            f"{args.working_size} px -> S={args.image_size}, batch {args.batch_size}, "
            f"{args.threads} torch thread(s); median of {args.repeats} x {args.seconds:g} s",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    results.setup_logging()
    torch.set_num_threads(args.threads)  # before the machine record, which reports it
    info = results.machine()
    if args.photos is None:
        cache = rendered_shapes(args.num_images, args.working_size, args.max_boxes)
        data = f"{len(cache['image'])} rendered shapes"
    else:
        args.photos = args.photos.expanduser().resolve()
        cache = cached_photos(args.photos, args.num_images, args.working_size, args.max_boxes)
        data = f"{len(cache['image'])} photos from {args.photos}, squeezed whole"
    out = run(cache, args)
    info["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    record = {
        "benchmark": "box_augment",
        "machine": info,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": data,
        "goal": {"classic_boxes_vs_v2": GOAL},
        **out,
    }
    title = "Box-aware augmentation images/s: raycv fused classic vs torchvision v2 per sample"
    print(results.header(title, info))
    print()
    print(report(out, args, data))
    results.write(args.out, record)


if __name__ == "__main__":
    main()
