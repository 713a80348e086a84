"""Mask-aware augmentation images/s: raycv's fused classic preset vs torchvision v2 per sample.

Both augment the same cached uint8 images with their segmentation masks, in this process, on
the same threads, with the same recipe (flips, rotation, random resized crop, colour jitter,
normalise; parameters from raycv's ``augment`` defaults):

* ``raycv classic``: one affine matrix per image, one ``grid_sample`` for the batch's pixels
  (bilinear) and one for its masks (nearest, ignore index outside the image).
* ``torchvision v2``: raycv's ``classic_v2`` preset, a ``transforms.v2`` pipeline called once
  per sample on the image and its ``tv_tensors.Mask`` (the only way v2 draws per image).

The same two run once more on the images alone, to show what carrying masks costs.  Each is
timed ``--repeats`` times for ``--seconds``, interleaved; images/s is the median.  Run by hand:

    python scripts/bench/seg_augment.py                       # shapes, 256 px cached -> 224
    python scripts/bench/seg_augment.py --photos              # the balloon photos and masks
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

GOAL = 2.0  # raycv classic vs torchvision v2, with masks
# Real photos with semantic masks beside the checkout (../shared/data, see its README).
BALLOON = Path(__file__).resolve().parents[3] / "shared" / "data" / "balloon" / "train"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = results.parser(__file__, __doc__, "every repeat of every method, with the machine")
    data = p.add_argument_group("data")
    data.add_argument(
        "--photos",
        type=Path,
        nargs="?",
        const=BALLOON,
        help="a folder of images/*.jpg with masks/<same stem>.png (class ids) to augment "
        f"instead of rendered shapes; alone: {BALLOON}",
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
        help="side of the cached square images and masks (default 256)",
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
    for name in ("num_images", "working_size", "image_size", "batch_size", "threads", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# ---------------------------------------------------------------- the cached images


def rendered_shapes(count: int, size: int) -> dict[str, np.ndarray]:
    """Shapes (medium: distractors of other classes) with semantic masks, label + 1 per object."""
    from raycv.data import shapes

    images, masks = [], []
    for index in range(count):
        sample = shapes.render(index, image_size=size, num_classes=6, difficulty="medium", seed=0)
        semantic = np.zeros((size, size), np.uint8)
        for visible, label in zip(sample["masks"], sample["labels"]):
            semantic[visible > 0] = label + 1  # visible pixels of different objects never overlap
        images.append(sample["image"])
        masks.append(semantic)
    return {"image": np.stack(images), "mask": np.stack(masks)}


def cached_photos(folder: Path, count: int, size: int) -> dict[str, np.ndarray]:
    """Photos squeezed whole into size x size as raycv caches them (``decode_whole``), their
    masks alike with nearest-neighbour, and the aspect that undoes the squeeze."""
    from PIL import Image

    from raycv.data.images import decode_whole

    paths = sorted((folder / "images").glob("*.jpg"))[:count]
    if not paths:
        raise SystemExit(f"error: no {folder / 'images'}/*.jpg: pass --photos DIR holding them")
    images, masks, aspects = [], [], []
    for path in paths:
        image, aspect = decode_whole(path.read_bytes(), str(path), size)
        mask = Image.open(folder / "masks" / f"{path.stem}.png")
        images.append(image)
        masks.append(np.asarray(mask.resize((size, size), Image.Resampling.NEAREST), np.uint8))
        aspects.append(aspect)
    return {"image": np.stack(images), "mask": np.stack(masks), "aspect": np.array(aspects)}


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


def run(cache: dict[str, np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    from raycv.config import AugmentConfig
    from raycv.data.augment import build_preset

    cfg = AugmentConfig()
    images_only = {k: v for k, v in cache.items() if k != "mask"}
    methods = {
        "classic_masks": ("classic", cache),
        "v2_masks": ("classic_v2", cache),
        "classic_images": ("classic", images_only),
        "v2_images": ("classic_v2", images_only),
    }
    runs: dict[str, list[float]] = {name: [] for name in methods}
    for repeat in range(args.repeats):  # interleaved, so a burst of load hits every method
        for name, (preset, data) in methods.items():
            speed = throughput(
                build_preset(preset, cfg, args.image_size), data, args.batch_size, args.seconds
            )
            runs[name].append(speed)
            log.info("repeat %d, %s: %.0f images/s", repeat + 1, name, speed)
    out = {name: {"repeats": r, "images_per_s": results.median(r)} for name, r in runs.items()}
    for masks in ("masks", "images"):
        out[f"classic_{masks}"]["vs_v2"] = results.ratio(
            out[f"classic_{masks}"]["images_per_s"], out[f"v2_{masks}"]["images_per_s"]
        )
    return {"methods": out, "augment": cfg.model_dump(mode="json")}


def report(out: dict[str, Any], args: argparse.Namespace, data: str) -> str:
    m = out["methods"]

    def row(label: str, name: str) -> tuple:
        repeats = " ".join(f"{v:.0f}" for v in m[name]["repeats"])
        return (label, m[name]["images_per_s"], m[name].get("vs_v2", 1.0), repeats)

    rows = [
        row("raycv classic: fused warp, images + masks", "classic_masks"),
        row("torchvision v2 per sample, Image + Mask", "v2_masks"),
        row("raycv classic: images alone", "classic_images"),
        row("torchvision v2 per sample: images alone", "v2_images"),
    ]
    got = m["classic_masks"]["vs_v2"] or 0.0
    verdict = "met" if got >= GOAL else "NOT met"
    return "\n".join(
        [
            results.table(["method", "images/s", "vs v2 (same inputs)", "per repeat"], rows),
            "",
            f"goal: raycv classic with masks >= {GOAL:.0f}x torchvision v2: {verdict} ({got:.2f}x)",
            f"{data}, cached at {args.working_size} px -> S={args.image_size}, batch "
            f"{args.batch_size}, {args.threads} torch thread(s); median of {args.repeats} x "
            f"{args.seconds:g} s",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    results.setup_logging()
    torch.set_num_threads(args.threads)  # before the machine record, which reports it
    info = results.machine()
    if args.photos is None:
        cache = rendered_shapes(args.num_images, args.working_size)
        data = f"{len(cache['image'])} rendered shapes"
    else:
        args.photos = args.photos.expanduser().resolve()
        cache = cached_photos(args.photos, args.num_images, args.working_size)
        data = f"{len(cache['image'])} photos from {args.photos}, squeezed whole"
    out = run(cache, args)
    info["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    record = {
        "benchmark": "seg_augment",
        "machine": info,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": data,
        "goal": {"classic_masks_vs_v2": GOAL},
        **out,
    }
    title = "Mask-aware augmentation images/s: raycv fused classic vs torchvision v2 per sample"
    print(results.header(title, info))
    print()
    print(report(out, args, data))
    results.write(args.out, record)


if __name__ == "__main__":
    main()
