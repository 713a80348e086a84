"""Mosaic for detection (``augment.mosaic``): a training sample made of four images tiled
2 x 2 at the working size, their boxes moved with them, before the train preset's warp
(whose random resized crop then shows a part of it, as YOLOX's larger canvas and crop do).
It shows small objects and busy scenes that single photos seldom have. It switches off for
the last ``augment.mosaic_off_epochs`` epochs, so that training ends on whole images like
those it is evaluated on.

Written here: torchvision's ``transforms.v2`` has no mosaic, and this one works on the
batches Ray Data already hands the preset (padded ``boxes`` (N, K, 4) and ``labels``
(N, K), -1 padding): the three partners of an image come from the same chunk of the
epoch's shuffled order, so they are random images too."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray
from PIL import Image

from raycv.config import Config

# Columns that belong to each box and move with it (besides the boxes themselves).
BOX_COLUMNS = ("labels", "crowd")


@dataclass(frozen=True)
class Mosaic:
    """Ray Data batch function of the training stream: each image becomes a mosaic with
    probability ``probability`` while the epoch the ``clock`` names is at most
    ``last_epoch``."""

    probability: float
    last_epoch: int
    clock: ray.actor.ActorHandle
    seed: int | None = None  # None: fresh draws each call (a preset's rule: see augment.py)

    @classmethod
    def of(cls, cfg: Config, clock: ray.actor.ActorHandle) -> Mosaic:
        last = cfg.train.epochs - cfg.augment.mosaic_off_epochs
        return cls(cfg.augment.mosaic, last, clock)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if ray.get(self.clock.get.remote()) > self.last_epoch:
            return batch
        rng = np.random.default_rng(self.seed)
        return tile(batch, rng.random(len(batch["image"])) < self.probability, rng)


def tile(batch: dict[str, np.ndarray], chosen: np.ndarray, rng: np.random.Generator) -> dict:
    """``batch`` with each ``chosen`` image replaced by a 2 x 2 mosaic of itself and three
    images of the batch drawn at random, in random quadrants, each at half the side."""
    out = {key: value.copy() for key, value in batch.items()}
    for i in np.flatnonzero(chosen):
        parts = rng.permutation([i, *rng.choice(len(batch["image"]), 3)])
        image, columns = _tiled(batch, parts)
        out["image"][i] = image
        for key, values in columns.items():
            out[key][i] = values
        if "aspect" in out:
            out["aspect"][i] = 1.0  # four squeezed tiles: no single shape to restore
    return out


def _tiled(batch: dict[str, np.ndarray], parts: np.ndarray) -> tuple[np.ndarray, dict]:
    """One mosaic of the images at ``parts`` (top left, top right, bottom left, bottom
    right) and its box columns, padded as the batch's are (boxes past K are dropped)."""
    size = batch["image"].shape[1]
    half = size // 2
    canvas = np.zeros_like(batch["image"][0])
    moved = {"boxes": [], **{c: [] for c in BOX_COLUMNS if c in batch}}
    for quadrant, j in enumerate(parts):
        top, left = (quadrant // 2) * half, (quadrant % 2) * half
        small = Image.fromarray(batch["image"][j]).resize((half, half), Image.Resampling.BOX)
        canvas[top : top + half, left : left + half] = np.asarray(small)
        real = batch["labels"][j] >= 0
        moved["boxes"].append(batch["boxes"][j][real] * (half / size) + [left, top, left, top])
        for column in moved.keys() - {"boxes"}:
            moved[column].append(batch[column][j][real])
    k = batch["labels"].shape[1]
    padded = {}
    for column, pieces in moved.items():
        values = np.concatenate(pieces)[:k]
        full = np.full_like(batch[column][0], -1 if column == "labels" else 0)
        full[: len(values)] = values
        padded[column] = full
    return canvas, padded
