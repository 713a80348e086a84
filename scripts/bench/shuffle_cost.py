"""What shuffling the training stream costs: seconds per epoch and how well batches mix.

Four ways to read one epoch of a real ImageFolder's cached training split, augmented as a
Train worker reads it, compared side by side: epochs are interleaved (A B C D A B C D ...)
so that the machine's noise falls on every method alike.

* ``cached order``: the cache as decoded, no shuffle (raycv before the fix: a folder's
  files are listed class by class).
* ``epoch order (raycv)``: ``data/order.py``, a permutation drawn from (seed, epoch) and
  gathered from the cached blocks chunk by chunk.
* ``random_shuffle``: Ray Data's all-to-all shuffle of the cached rows every epoch.
* ``block order + local buffer``: ``randomize_block_order`` and a shuffle buffer of
  ``--buffer-batches`` batches in the consumer.

"classes per batch" is the mean number of distinct classes in a batch: what a uniform
shuffle gives is shown alongside (computed, not measured).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import results

log = results.log
METHODS = ("cached order", "epoch order (raycv)", "random_shuffle", "block order + local buffer")


def parse_args(argv: list[str] | None = None):
    p = results.parser(__file__, __doc__, "seconds per epoch and classes per batch per method")
    results.add_photo_folder(p)
    p.add_argument("--image-size", type=int, default=224, help="model input size (px)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch read")
    p.add_argument("--epochs", type=int, default=4, help="epochs timed per method")
    p.add_argument("--buffer-batches", type=int, default=4, help="local shuffle buffer, in batches")
    args = p.parse_args(argv)
    results.check_photo_folder(args)
    return args


def config(args):
    from raycv.config import from_dict

    return from_dict(
        {
            "experiment": "bench",
            "data": {
                "source": "folder",
                "folder": {"root": str(args.root), "val_split": args.val_split},
            },
            "model": {"image_size": args.image_size},
            "train": {"batch_size": args.batch_size},
            "scaling": {"num_workers": 1},
        }
    )


def readers(cfg, args) -> dict[str, Any]:
    """Each method: a function that reads epoch ``e`` and returns its batches' labels."""
    import ray

    from raycv.data.augment import build_preset
    from raycv.data.order import CachedRows, epoch_stream
    from raycv.data.pipeline import AUGMENT_BATCH
    from raycv.data.sources import SOURCES

    cache = SOURCES.get("folder")(cfg).train
    augment = build_preset(cfg.augment.train_preset, cfg.augment, cfg.model.image_size)

    def augmented(ds, batch_size=AUGMENT_BATCH):
        return ds.map_batches(augment, batch_size=batch_size, batch_format="numpy")

    ordered, clock = epoch_stream(CachedRows.of(cache), cfg.seed)
    buffer = args.buffer_batches * args.batch_size

    def cached(epoch):
        return augmented(cache).iter_batches(batch_size=args.batch_size, drop_last=True)

    def epoch_order(epoch):
        ray.get(clock.set.remote(epoch))
        return augmented(ordered, None).iter_batches(batch_size=args.batch_size, drop_last=True)

    def shuffled(epoch):
        ds = augmented(cache.random_shuffle(seed=epoch))
        return ds.iter_batches(batch_size=args.batch_size, drop_last=True)

    def blocks(epoch):
        ds = augmented(cache.randomize_block_order(seed=epoch))
        return ds.iter_batches(
            batch_size=args.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=buffer,
            local_shuffle_seed=epoch,
        )

    return dict(zip(METHODS, (cached, epoch_order, shuffled, blocks))), cache.count()


def timed(read, epoch: int) -> dict[str, float]:
    started = time.perf_counter()
    labels = [b["label"] for b in read(epoch)]
    seconds = time.perf_counter() - started
    images = sum(len(b) for b in labels)
    return {
        "seconds": seconds,
        "images": images,
        "classes_per_batch": float(np.mean([len(np.unique(b)) for b in labels])),
    }


def uniform_classes_per_batch(cfg, batch: int) -> float:
    """Distinct classes expected in a batch drawn uniformly (the split's class shares)."""
    from raycv.data.sources import filesystem, find_split

    fs, root = filesystem(cfg.data.folder.root)
    files = find_split(fs, root, cfg).train
    _, counts = np.unique([Path(f).parent.name for f in files], return_counts=True)
    n = counts.sum()
    # P(class c absent) = C(n - n_c, b) / C(n, b), as a running product.
    absent = [np.prod([(n - c - i) / (n - i) for i in range(batch)]) for c in counts]
    return float(len(counts) - sum(absent))


def run(args) -> dict[str, Any]:
    import ray

    from raycv.session import ensure_ray

    cfg = config(args)
    ensure_ray(cfg)
    try:
        read, num_train = readers(cfg, args)
        for fn in read.values():  # warm-up: the first execution starts Ray Data's pools
            timed(fn, 0)
        epochs = {name: [] for name in METHODS}
        for epoch in range(1, args.epochs + 1):
            for name, fn in read.items():
                epochs[name].append(timed(fn, epoch))
                log.info("%s epoch %d: %.2f s", name, epoch, epochs[name][-1]["seconds"])
    finally:
        ray.shutdown()
    base = results.median([e["seconds"] for e in epochs["cached order"]])
    methods = {}
    for name, runs in epochs.items():
        seconds = results.median([e["seconds"] for e in runs])
        methods[name] = {
            "epochs": runs,
            "seconds_per_epoch": seconds,
            "vs_cached_order": results.ratio(seconds, base),
            "classes_per_batch": results.median([e["classes_per_batch"] for e in runs]),
        }
    return {
        "methods": methods,
        "num_train": num_train,
        "working_size": cfg.working_size,
        "uniform_classes_per_batch": uniform_classes_per_batch(cfg, args.batch_size),
    }


def report(out: dict[str, Any], args) -> str:
    rows = [
        [name, m["seconds_per_epoch"], m["vs_cached_order"], m["classes_per_batch"]]
        for name, m in out["methods"].items()
    ]
    return "\n".join(
        [
            results.table(["method", "s/epoch", "vs cached", "classes per batch"], rows),
            f"{out['num_train']} training images at {out['working_size']} px, batches of "
            f"{args.batch_size}; a uniform shuffle gives "
            f"{out['uniform_classes_per_batch']:.2f} classes per batch",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results.setup_logging()
    info = results.machine()
    out = run(args)
    print(results.header("Shuffling the training stream: cost and mixing", info))
    print(report(out, args))
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    data = {"benchmark": "shuffle_cost", "machine": info, "args": arguments, **out}
    results.write(args.out, data)


if __name__ == "__main__":
    main()
