"""The streams a training run reads: a source's cached images, augmented per epoch in
Ray Data ``map_batches`` (train preset) or prepared for evaluation (eval preset)."""

from __future__ import annotations

from dataclasses import dataclass

import ray.data

from raycv.config import Config
from raycv.data.augment import build_preset
from raycv.data.sources import SOURCES
from raycv.errors import DataError

AUGMENT_BATCH = 64  # large enough to amortise the fused warp, small enough to stream


@dataclass
class Streams:
    train: ray.data.Dataset
    val: ray.data.Dataset
    train_eval: ray.data.Dataset  # the train split prepared as for evaluation (calibration)
    class_names: list[str]
    num_train: int
    num_val: int
    skipped: list[str]


def build_streams(cfg: Config) -> Streams:
    source = SOURCES.get(cfg.data.source)(cfg)
    num_train, num_val = source.train.count(), source.val.count()
    check_sizes(cfg, num_train, num_val, len(source.skipped))
    size, aug = cfg.model.image_size, cfg.augment
    train = source.train.map_batches(
        build_preset(aug.train_preset, aug, size), batch_size=AUGMENT_BATCH, batch_format="numpy"
    )
    prepare = build_preset(aug.eval_preset, aug, size)
    val = source.val.map_batches(prepare, batch_size=AUGMENT_BATCH, batch_format="numpy")
    # Lazy like the others: only calibration and Taylor pruning ever read it.
    train_eval = source.train.map_batches(prepare, batch_size=AUGMENT_BATCH, batch_format="numpy")
    return Streams(train, val, train_eval, source.class_names, num_train, num_val, source.skipped)


def check_sizes(cfg: Config, num_train: int, num_val: int, skipped: int) -> None:
    """Refuse data that cannot be validated or give each worker one step per epoch,
    before any worker starts."""
    if num_train == 0 or num_val == 0:
        which = "training" if num_train == 0 else "validation"
        hint = "" if num_train == 0 else " (or remove the val folder: data.val_fraction carves one)"
        raise DataError(
            f"the {which} split has no readable images (train {num_train}, val {num_val}, "
            f"{skipped} unreadable files skipped); add images to it{hint}"
        )
    accum = cfg.train.grad_accum_steps
    if num_train < cfg.train.batch_size * accum:  # not one step per epoch (loop.steps_per_epoch)
        step = 1 if cfg.scaling.elastic else cfg.scaling.num_workers  # a fixed run's multiple
        largest = num_train // accum // step * step
        fix = (
            f"set train.batch_size={largest} or lower"
            if largest >= cfg.scaling.max_workers
            else "lower train.grad_accum_steps or scaling.num_workers, or add images"
        )
        raise DataError(
            f"train.batch_size={cfg.train.batch_size} (x{accum} accumulation) is larger than "
            f"the {num_train} training images: not one step per epoch; {fix}"
        )
