"""The streams a training run reads: a source's cached images, read in each epoch's
order (``data/order.py``), tiled into mosaics where configured (``data/mosaic.py``) and
augmented in Ray Data ``map_batches`` (train preset), or prepared for evaluation in a fixed
order (eval preset). With ``augment.where=worker`` the training workers read both streams'
working-size images and run both presets on their own device (``Preset.apply``), so that no
Ray Data process of the run imports torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ray.data

from raycv.config import Config
from raycv.data.augment import Preset, build_preset
from raycv.data.mosaic import Mosaic
from raycv.data.order import CHUNK, CachedRows, epoch_stream, stratified_sample
from raycv.data.preset_step import PresetStep
from raycv.data.sources import SOURCES
from raycv.errors import DataError
from raycv.tasks import TASKS

AUGMENT_BATCH = CHUNK  # large enough to amortise the fused warp, small enough to stream


@dataclass
class Streams:
    # the epoch that ``clock`` names, in its order, augmented (or, when the workers augment,
    # the working-size images for them)
    train: ray.data.Dataset
    clock: ray.actor.ActorHandle  # data/order.EpochClock: set by the loop before each epoch
    val: ray.data.Dataset  # prepared for evaluation
    val_cached: ray.data.Dataset  # the working-size images, for workers that prepare them
    class_names: list[str]
    num_train: int
    num_val: int
    skipped: list[str]
    train_rows: CachedRows
    augment: Preset
    prepare: Preset

    def for_training(self, cfg: Config) -> dict[str, ray.data.Dataset]:
        """What the training workers read, by Ray Train's dataset names."""
        return {"train": self.train, "val": self.val_cached if cfg.augments_on_worker else self.val}

    def train_sample(self, count: int, seed: int, augmented: bool = False) -> ray.data.Dataset:
        """``count`` training images drawn at random, stratified by class where rows have
        one (calibration, Taylor importance, previews), prepared for evaluation or augmented
        as for training."""
        rows = stratified_sample(self.train_rows.labels, count, seed)
        preset = self.augment if augmented else self.prepare
        return _augmented(self.train_rows.rows_dataset(rows), preset)


def build_streams(cfg: Config) -> Streams:
    source = SOURCES.get(cfg.data.source)(cfg)
    num_train, num_val = source.train.count(), source.val.count()
    check_sizes(cfg, num_train, num_val, len(source.skipped))
    augment, prepare = preset_of(cfg, train=True), preset_of(cfg, train=False)
    rows = CachedRows.of(source.train)
    ordered, clock = epoch_stream(rows, cfg.seed)
    if cfg.augment.mosaic:  # before the warp, in the same tasks (batch_size=None)
        ordered = _mapped(ordered, Mosaic.of(cfg, clock), batch_size=None)
    return Streams(
        train=ordered if cfg.augments_on_worker else _augmented(ordered, augment),
        clock=clock,
        val=_augmented(source.val, prepare, AUGMENT_BATCH),
        val_cached=source.val,
        class_names=source.class_names,
        num_train=num_train,
        num_val=num_val,
        skipped=source.skipped,
        train_rows=rows,
        augment=augment,
        prepare=prepare,
    )


def preset_of(cfg: Config, *, train: bool) -> Preset:
    """The train or the eval preset, wherever it runs (Ray Data, the training workers,
    batch prediction); the eval one keeps the whole frame where the task scores it."""
    aug = cfg.augment
    return build_preset(
        aug.train_preset if train else aug.eval_preset,
        aug,
        cfg.model.image_size,
        ignore_index=cfg.data.ignore_index,
        whole_frame=not train and TASKS.get(cfg.task).whole_frame,
    )


def _augmented(
    ds: ray.data.Dataset, preset: Preset, batch_size: int | None = None
) -> ray.data.Dataset:
    """``preset`` mapped as a PresetStep (by default on each gathered chunk, data/order.py):
    the processes that only pass the plan on never import torch for it."""
    return _mapped(ds, PresetStep.of(preset), batch_size)


def _mapped(ds: ray.data.Dataset, fn: Callable, batch_size: int | None) -> ray.data.Dataset:
    """``batch_size=None`` after a gather (data/order.py): each block is one gathered chunk
    of ``CHUNK`` rows, and without a batch size Ray Data fuses ``fn`` into the gather's
    tasks, one chunk each (with one, it bundles the chunks into as few tasks as fill it)."""
    return ds.map_batches(fn, batch_size=batch_size, batch_format="numpy")


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
