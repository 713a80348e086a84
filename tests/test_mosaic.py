"""Mosaic for detection: four images tiled 2 x 2 with their boxes, switched off for the last
epochs; in the training stream, before the preset's warp."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from raycv.config import ConfigError, from_dict
from raycv.data.boxes import mask_box
from raycv.data.mosaic import Mosaic, tile
from raycv.data.order import EpochClock
from raycv.data.pipeline import build_streams

SIZE, K = 64, 5


def rectangles(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n black images, image j holding one filled rectangle of grey level 40 + 20 (j mod 10) (so
    the pixels tell which of ten images a tile came from), its box, and label j."""
    rng = np.random.default_rng(seed)
    batch = {
        "image": np.zeros((n, SIZE, SIZE, 3), np.uint8),
        "boxes": np.zeros((n, K, 4), np.float32),
        "labels": np.full((n, K), -1, np.int64),
        "crowd": np.zeros((n, K), np.int64),
        "aspect": np.full(n, 1.5, np.float32),
    }
    for j in range(n):
        x0, y0 = rng.integers(0, SIZE - 24, 2)
        w, h = rng.integers(12, 24, 2)
        batch["image"][j, y0 : y0 + h, x0 : x0 + w] = 40 + 20 * (j % 10)
        batch["boxes"][j, 0] = (x0, y0, x0 + w, y0 + h)
        batch["labels"][j, 0] = j
        batch["crowd"][j, 0] = j % 2
    return batch


def test_each_tile_keeps_its_box_label_and_crowd_flag():
    batch = rectangles(6)
    out = tile(batch, np.array([True, False, True, False, False, True]), np.random.default_rng(1))
    assert (out["image"][[1, 3, 4]] == batch["image"][[1, 3, 4]]).all()  # not chosen: as they were
    assert (out["aspect"][[0, 2, 5]] == 1.0).all() and out["aspect"][1] == 1.5
    for i in (0, 2, 5):
        real = out["labels"][i] >= 0
        assert real.sum() == 4  # one box from each of the four tiles
        for box, label, crowd in zip(
            out["boxes"][i][real], out["labels"][i][real], out["crowd"][i][real]
        ):
            # The pixels of the tile this box lies in: only its own rectangle is lit.
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            left, top = (cx >= SIZE // 2) * SIZE // 2, (cy >= SIZE // 2) * SIZE // 2
            quadrant = out["image"][i, top : top + SIZE // 2, left : left + SIZE // 2, 0]
            lit = mask_box(quadrant >= quadrant.max() / 2) + np.array([left, top, left, top])
            # Tiles are half size: an edge may fall mid-pixel, which then reads half grey.
            assert np.abs(box - lit).max() <= 0.5  # the box still fits its rectangle
            grey = np.median(quadrant[quadrant > 0])
            assert abs(grey - (40 + 20 * label)) <= 10  # the label came with its own image
            assert crowd == label % 2


def test_boxes_past_the_padding_are_dropped():
    batch = rectangles(4)
    two = {**batch, "boxes": batch["boxes"][:, :2], "labels": batch["labels"][:, :2]}
    two["crowd"] = batch["crowd"][:, :2]
    out = tile(two, np.ones(4, bool), np.random.default_rng(0))
    assert ((out["labels"] >= 0).sum(axis=1) == 2).all()


@pytest.fixture(scope="module")
def clock(ray_local):
    return EpochClock.remote()


def test_mosaic_draws_per_image_and_switches_off_for_the_last_epochs(clock):
    batch = rectangles(64)
    mosaic = Mosaic(probability=0.5, last_epoch=8, clock=clock, seed=3)
    ray.get(clock.set.remote(8))
    tiled = (mosaic(batch)["labels"] >= 0).sum(axis=1) == 4
    assert 16 < tiled.sum() < 48  # about half of the images, each drawn on its own
    ray.get(clock.set.remote(9))  # past the last mosaic epoch: whole images again
    assert all((mosaic(batch)[k] == batch[k]).all() for k in batch)


def test_the_training_stream_tiles_until_the_last_epochs(ray_local, tmp_path):
    still = ["augment.rotation=0", "augment.scale=[1.0,1.0]", "augment.hflip=0", "augment.vflip=0"]
    cfg = from_dict(
        {},
        [
            "task=detection",
            "model.name=yolo_n",
            "data.shapes.num_images=96",
            f"model.image_size={SIZE}",
            "train.epochs=3",
            "augment.mosaic=1.0",
            "augment.mosaic_off_epochs=1",
            "augment.ratio=[1.0,1.0]",
            *still,
            f"run.storage={tmp_path}",
        ],
    )
    streams = build_streams(cfg)

    def boxes_per_image(epoch: int) -> float:
        ray.get(streams.clock.set.remote(epoch))
        labels = np.concatenate(
            [b["labels"] for b in streams.train.iter_batches(batch_format="numpy")]
        )
        return float((labels >= 0).sum(axis=1).mean())

    single = boxes_per_image(3)  # the last epoch: whole images
    assert single >= 1.0
    assert boxes_per_image(2) > 3.5 * single  # four images' boxes (a few past K dropped)


def test_mosaic_is_refused_for_tasks_without_boxes():
    with pytest.raises(
        ConfigError, match=r"augment.mosaic tiles images with their boxes, and task=segmentation"
    ):
        from_dict({}, ["task=segmentation", "model.name=unet", "augment.mosaic=0.5"])
