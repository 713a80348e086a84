"""Augmented images/s: raycv's Ray Data pipeline vs a plain torchvision DataLoader.

Both read the same ImageFolder of JPEGs and produce the same recipe at the same size S
(random resized crop, horizontal and vertical flips, rotation, colour jitter, normalise):

* ``torchvision DataLoader``: ``ImageFolder`` + a PIL ``transforms.Compose``, ``num_workers`` =
  cores; it decodes every JPEG in every epoch (the classic baseline).
* ``raycv classic``: ``raycv.data.pipeline.build_streams`` decodes each file once to the working
  size and caches it in Ray's object store; each epoch then pays only for the fused-warp
  augmentation in Ray Data ``map_batches``, read with ``iter_torch_batches`` as training does,
  uint8 off the stream and normalised to float in the reading process as the loop does.
* ``raycv classic_v2``: the same pipeline with torchvision v2 called once per image, to show
  what the fused warp buys.

The decode-once cost is reported on its own row, and once more spread over the timed epochs;
a second decode of the same files, after the epochs, shows the rate once Ray Data's
processes are up (the first pays for starting them).
A last row times the classic preset alone on one thread, in this process, with no Ray: the
most one core can augment, so the Ray rows show what streaming costs on top.
Images/s per method is the median over epochs.  Run by hand, not in CI:

    python scripts/bench/data_throughput.py                 # ~1200 images, 3 epochs, S=128
    python scripts/bench/data_throughput.py --folder ~/data/flowers --image-size 224 --epochs 5
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import results

log = logging.getLogger("bench")

GOAL = 3.0  # raycv classic vs the DataLoader
DECODE_GOAL = 1.0  # decoding every file once vs the DataLoader decoding and augmenting
WITH_DECODE_GOAL = 1.5  # over the timed epochs, the decode counted


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = results.parser(__file__, __doc__, "the full results (every epoch, the machine)")
    data = p.add_argument_group("data")
    data.add_argument(
        "--folder",
        type=Path,
        help="an existing ImageFolder root (<root>/train/<class>/*.jpg, or <root>/<class>/*.jpg) "
        "to read instead of generating one in a temporary folder",
    )
    data.add_argument(
        "--num-images",
        type=int,
        default=1200,
        help="training JPEGs to generate (default 1200); raycv's train stream and the "
        "DataLoader both read exactly these",
    )
    data.add_argument(
        "--val-images",
        type=int,
        help="validation JPEGs generated under <root>/val, which raycv decodes too "
        "(default: a tenth of --num-images)",
    )
    data.add_argument(
        "--source-size",
        type=int,
        default=256,
        help="side of each generated JPEG in pixels (default 256; real photos: 400-500 or more)",
    )
    data.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    data.add_argument(
        "--num-classes", type=int, default=6, help="shape classes generated (default 6)"
    )
    run = p.add_argument_group("measurement")
    run.add_argument(
        "--image-size",
        type=int,
        default=128,
        help="output side S of the augmentation, the same for every method (default 128)",
    )
    run.add_argument(
        "--epochs", type=int, default=3, help="epochs timed per method; median reported (default 3)"
    )
    run.add_argument(
        "--batch-size", type=int, default=64, help="batch size read by every method (default 64)"
    )
    run.add_argument(
        "--loader-workers",
        type=int,
        default=os.cpu_count() or 1,
        help=f"DataLoader worker processes (default: os.cpu_count() = {os.cpu_count()})",
    )
    run.add_argument(
        "--skip-v2",
        action="store_true",
        help="leave out the classic_v2 row (the slowest one)",
    )
    args = p.parse_args(argv)
    for name in ("num_images", "source_size", "image_size", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.val_images is None:
        args.val_images = max(args.num_classes, args.num_images // 10)
    return args


# ---------------------------------------------------------------- the folder of JPEGs


def make_folder(root: Path, args: argparse.Namespace) -> None:
    """root/{train,val}/<class>/<index>.jpg rendered by raycv's shapes source."""
    from raycv.data import shapes

    names = shapes.class_names(args.num_classes)
    jobs = [("train", i) for i in range(args.num_images)]
    jobs += [("val", args.num_images + i) for i in range(args.val_images)]
    render = {
        "image_size": args.source_size,
        "num_classes": args.num_classes,
        "difficulty": "medium",
        "seed": 0,
    }
    started = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        chunks = [jobs[k : k + 100] for k in range(0, len(jobs), 100)]
        for _ in pool.map(_write_jpegs, [(root, c, names, render, args.quality) for c in chunks]):
            pass
    log.info(
        "generated %d JPEGs (%d px, quality %d) in %s in %.1f s",
        len(jobs),
        args.source_size,
        args.quality,
        root,
        time.perf_counter() - started,
    )


def _write_jpegs(job: tuple[Path, list[tuple[str, int]], list[str], dict, int]) -> None:
    from PIL import Image

    from raycv.data import shapes

    root, items, names, render, quality = job
    for split, index in items:
        sample = shapes.render(index, **render)
        folder = root / split / names[sample["label"]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample["image"]).save(folder / f"{index:06d}.jpg", quality=quality)


def train_dir(root: Path) -> Path:
    """The folder the DataLoader reads: the train split if there is one (as raycv decides)."""
    return root / "train" if (root / "train").is_dir() else root


# ---------------------------------------------------------------- the two sides


def dataloader_epochs(root: Path, cfg, args: argparse.Namespace) -> list[dict[str, float]]:
    """The classic baseline: PIL transforms on every decoded JPEG, every epoch."""
    import torch
    from torchvision import datasets, transforms

    a = cfg.augment
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(args.image_size, scale=a.scale, ratio=a.ratio),
            transforms.RandomHorizontalFlip(a.hflip),
            transforms.RandomVerticalFlip(a.vflip),
            # bilinear, as both raycv presets (the v1 default is nearest, cheaper but blockier)
            transforms.RandomRotation(
                a.rotation, interpolation=transforms.InterpolationMode.BILINEAR
            ),
            transforms.ColorJitter(a.brightness, a.contrast, a.saturation),
            transforms.ToTensor(),
            transforms.Normalize(a.mean, a.std),
        ]
    )
    dataset = datasets.ImageFolder(str(train_dir(root)), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.loader_workers, shuffle=True
    )
    return [_timed_epoch(loader, lambda batch: len(batch[1])) for _ in range(args.epochs)]


def raycv_config(root: Path, args: argparse.Namespace, preset: str):
    from raycv.config import from_dict

    return from_dict(
        {
            "experiment": "bench",
            "data": {"source": "folder", "folder": {"root": str(root)}},
            "model": {"image_size": args.image_size},
            "augment": {"train_preset": preset},
            "train": {"batch_size": args.batch_size},
            "scaling": {"num_workers": 1},
        }
    )


def raycv_epochs(cfg, args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Decode once (timed), then iterate the augmented train stream as a Train worker does."""
    from raycv.data.augment import normalize
    from raycv.data.pipeline import build_streams

    started = time.perf_counter()
    streams = build_streams(cfg)
    seconds = time.perf_counter() - started
    decoded = streams.num_train + streams.num_val
    decode = {
        "images": decoded,
        "train_images": streams.num_train,
        "seconds": seconds,
        "images_per_s": decoded / seconds,
        "skipped": len(streams.skipped),
    }

    def batches():
        # uint8 off the stream, normalised where the model runs: the DataLoader's output
        for batch in streams.train.iter_torch_batches(
            batch_size=args.batch_size, prefetch_batches=cfg.train.prefetch_batches
        ):
            batch["image"] = normalize(batch["image"], cfg.augment)
            yield batch

    epochs = [_timed_epoch(batches(), lambda b: len(b["label"])) for _ in range(args.epochs)]
    return decode, epochs


def decode_again(cfg) -> dict[str, float]:
    """The same decode once more, now that Ray Data's processes are up: its per-core rate
    without the one-time start (Ray Data's actors and fresh worker processes)."""
    from raycv.data.pipeline import build_streams

    started = time.perf_counter()
    streams = build_streams(cfg)
    seconds = time.perf_counter() - started
    decoded = streams.num_train + streams.num_val
    return {"images": decoded, "seconds": seconds, "images_per_s": decoded / seconds}


def transform_alone(cfg, args: argparse.Namespace, seconds: float = 3.0) -> dict[str, float]:
    """The classic preset on cached-size uint8 batches, one thread, no Ray: one core's most."""
    import numpy as np
    import torch

    from raycv.data.augment import build_preset

    preset = build_preset("classic", cfg.augment, args.image_size)
    size = cfg.working_size
    shape = (args.batch_size, size, size, 3)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, shape, np.uint8), "label": np.zeros(shape[0], np.int64)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        preset(batch)  # warm-up
        images, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            images += len(preset(batch)["image"])
        elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    return {"images": images, "seconds": elapsed, "images_per_s": images / elapsed}


def _timed_epoch(batches: Iterable, count: Callable[[Any], int]) -> dict[str, float]:
    """One pass over ``batches``; ``count`` says how many images a batch holds."""
    started = time.perf_counter()
    images = sum(count(batch) for batch in batches)
    seconds = time.perf_counter() - started
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


# ---------------------------------------------------------------- driver


def run(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from raycv.session import ensure_ray, local_cpus

    classic = raycv_config(root, args, "classic")
    methods: dict[str, Any] = {}

    # The baseline runs first, while no Ray process competes for the cores.
    log.info("torchvision DataLoader: %d epochs ...", args.epochs)
    methods["dataloader"] = {"epochs": dataloader_epochs(root, classic, args)}
    alone = transform_alone(classic, args)

    ensure_ray(classic)
    try:
        log.info("raycv classic: decode once, then %d epochs ...", args.epochs)
        decode, epochs = raycv_epochs(classic, args)
        methods["raycv_classic"] = {"epochs": epochs}
        again = decode_again(classic)
        if not args.skip_v2:
            log.info("raycv classic_v2: decode once, then %d epochs ...", args.epochs)
            v2_decode, v2_epochs = raycv_epochs(raycv_config(root, args, "classic_v2"), args)
            methods["raycv_classic_v2"] = {"epochs": v2_epochs, "decode_once": v2_decode}
    finally:
        ray.shutdown()

    for m in methods.values():
        m["images_per_s"] = results.median([e["images_per_s"] for e in m["epochs"]])
    total = decode["seconds"] + sum(e["seconds"] for e in epochs)
    amortised = sum(e["images"] for e in epochs) / total
    base = methods["dataloader"]["images_per_s"]
    for m in methods.values():
        m["vs_dataloader"] = results.ratio(m["images_per_s"], base)
    for d in (decode, again):
        d["vs_dataloader"] = results.ratio(d["images_per_s"], base)
    return {
        "methods": methods,
        "decode_once": decode,
        "decode_again_warm": again,
        "raycv_classic_with_decode": {
            "images_per_s": amortised,
            "vs_dataloader": results.ratio(amortised, base),
        },
        "classic_transform_one_thread": {
            **alone,
            "vs_dataloader": results.ratio(alone["images_per_s"], base),
        },
        "ray_logical_cpus": local_cpus(classic),
        "working_size": classic.working_size,
        "augment": classic.augment.model_dump(mode="json"),
    }


def report(out: dict[str, Any], args: argparse.Namespace) -> str:
    m, decode, again = out["methods"], out["decode_once"], out["decode_again_warm"]

    def epochs(name: str) -> str:
        return " ".join(f"{e['images_per_s']:.0f}" for e in m[name]["epochs"])

    rows = [
        (
            f"torchvision DataLoader, PIL, decode every epoch ({args.loader_workers} workers)",
            m["dataloader"]["images_per_s"],
            1.0,
            epochs("dataloader"),
        ),
        (
            "raycv classic: fused warp, Ray Data, cached",
            m["raycv_classic"]["images_per_s"],
            m["raycv_classic"]["vs_dataloader"],
            epochs("raycv_classic"),
        ),
    ]
    if "raycv_classic_v2" in m:
        rows.append(
            (
                "raycv classic_v2: v2 per image, Ray Data, cached",
                m["raycv_classic_v2"]["images_per_s"],
                m["raycv_classic_v2"]["vs_dataloader"],
                epochs("raycv_classic_v2"),
            )
        )
    rows += [
        (
            f"raycv decode once ({decode['images']} files, {decode['seconds']:.1f} s)",
            decode["images_per_s"],
            decode["vs_dataloader"],
            "",
        ),
        (
            f"raycv decode again, Ray Data's processes up ({again['seconds']:.1f} s)",
            again["images_per_s"],
            again["vs_dataloader"],
            "",
        ),
        (
            f"raycv classic incl. decode once, over {args.epochs} epochs",
            out["raycv_classic_with_decode"]["images_per_s"],
            out["raycv_classic_with_decode"]["vs_dataloader"],
            "",
        ),
        (
            "classic transform alone: 1 thread, no Ray (one core's most)",
            out["classic_transform_one_thread"]["images_per_s"],
            out["classic_transform_one_thread"]["vs_dataloader"],
            "",
        ),
    ]
    goals = (
        ("raycv classic", m["raycv_classic"]["vs_dataloader"], GOAL),
        ("decode once", decode["vs_dataloader"], DECODE_GOAL),
        (
            f"incl. decode over {args.epochs} epochs",
            out["raycv_classic_with_decode"]["vs_dataloader"],
            WITH_DECODE_GOAL,
        ),
    )
    lines = [
        results.table(["method", "images/s", "vs DataLoader", "per epoch"], rows),
        "",
        *(
            f"goal: {name} >= {goal:g}x the DataLoader: "
            f"{'met' if (got or 0.0) >= goal else 'NOT met'} ({got or 0.0:.2f}x)"
            for name, got, goal in goals
        ),
        f"images/s = median over {args.epochs} epochs of {decode['train_images']} training "
        f"images, S={args.image_size} (raycv caches at {out['working_size']} px), "
        f"batch {args.batch_size}; Ray with {out['ray_logical_cpus']} logical CPUs",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results.setup_logging()
    info = results.machine()
    with tempfile.TemporaryDirectory(prefix="raycv-bench-") as tmp:
        root = args.folder
        if root is None:
            root = Path(tmp) / "images"
            make_folder(root, args)
        out = run(root.expanduser().resolve(), args)
    info["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    data = {
        "benchmark": "data_throughput",
        "machine": info,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "goal": {"raycv_classic_vs_dataloader": GOAL},
        **out,
    }
    title = "Augmented images/s: raycv Ray Data pipeline vs torchvision DataLoader"
    print(results.header(title, info))
    print()
    print(report(out, args))
    results.write(args.out, data)


if __name__ == "__main__":
    main()
