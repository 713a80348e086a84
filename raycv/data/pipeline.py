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
    class_names: list[str]
    num_train: int
    num_val: int
    skipped: list[str]


def build_streams(cfg: Config) -> Streams:
    source = SOURCES.get(cfg.data.source)(cfg)
    num_train, num_val = source.train.count(), source.val.count()
    if num_train == 0 or num_val == 0:
        raise DataError(f"no readable images left (train {num_train}, val {num_val}); check data.*")
    workers = cfg.scaling.num_workers
    if num_train // workers < cfg.train.batch_size // workers * cfg.train.grad_accum_steps:
        raise DataError(
            f"train.batch_size={cfg.train.batch_size} (x{cfg.train.grad_accum_steps} accumulation) "
            f"is larger than the {num_train} training images; lower train.batch_size"
        )
    size, aug = cfg.model.image_size, cfg.augment
    train = source.train.map_batches(
        build_preset(aug.train_preset, aug, size), batch_size=AUGMENT_BATCH, batch_format="numpy"
    )
    val = source.val.map_batches(
        build_preset(aug.eval_preset, aug, size), batch_size=AUGMENT_BATCH, batch_format="numpy"
    )
    return Streams(train, val, source.class_names, num_train, num_val, source.skipped)
