"""The shapes source for segmentation: each row's mask holds, on every visible pixel of every
drawn object, that object's class id + 1, and 0 (background) elsewhere; deterministic by
seed. Classification rows stay as they were: the image and the main shape's label."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from raycv.config import from_dict
from raycv.data import shapes
from raycv.data.sources import SOURCES, split_indices

SIZE = 32
SHAPES = {"num_images": 24, "image_size": SIZE, "num_classes": 5, "difficulty": "hard"}
MODELS = {"segmentation": "lraspp_mobilenet_v3_large", "classification": "resnet18"}


def cfg_for(task: str = "segmentation", working_size: int = SIZE, **shapes_options):
    return from_dict(
        {
            "task": task,
            "model": {"name": MODELS[task]},
            "data": {
                "source": "shapes",
                "shapes": {**SHAPES, **shapes_options},
                "val_fraction": 0.25,
                "working_size": working_size,
            },
        }
    )


def rendered(index: int, seed: int = 0) -> dict:
    render_args = {k: v for k, v in SHAPES.items() if k != "num_images"}
    return shapes.render(index, seed=seed, **render_args)


def row_indices() -> tuple[list[int], list[int]]:
    train_idx, val_idx = split_indices(SHAPES["num_images"], 0.25, 0)
    return train_idx.tolist(), val_idx.tolist()


@pytest.fixture(scope="module")
def segmented(ray_local) -> tuple[list[str], list[dict], list[dict]]:
    data = SOURCES.get("shapes")(cfg_for())
    return data.class_names, data.train.take_all(), data.val.take_all()


def test_class_names_put_the_background_first(segmented):
    names, _, _ = segmented
    assert names == ["background", *shapes.SHAPE_CLASSES[:5]]


def test_masks_hold_the_class_of_every_visible_object(segmented):
    _, train, val = segmented
    train_idx, val_idx = row_indices()
    distractors = 0
    for row, index in zip(train + val, train_idx + val_idx, strict=True):
        sample = rendered(index)
        mask = row["mask"]
        assert set(row) == {"image", "mask"}
        assert mask.dtype == np.uint8 and mask.shape == (SIZE, SIZE)
        np.testing.assert_array_equal(row["image"], sample["image"])
        covered = np.zeros((SIZE, SIZE), bool)
        for visible, label in zip(sample["masks"].astype(bool), sample["labels"]):
            assert (mask[visible] == label + 1).all()
            covered |= visible
        # Outside the objects: background, or the pieces of distractors too small to count
        # as objects (under 20 px each) that are still drawn, and labelled as what they are.
        pieces = mask[~covered] != 0
        assert pieces.sum() < 3 * 20  # "hard" draws at most 3 distractors
        np.testing.assert_array_equal(mask, sample["semantic"])
        assert sample["label"] + 1 in mask  # the main shape is always visible
        distractors += len(sample["labels"]) - 1
    assert distractors >= 5  # "hard": objects of other classes share some images


def test_masks_are_resized_nearest_to_the_working_size(ray_local):
    data = SOURCES.get("shapes")(cfg_for(working_size=45))
    train_idx, _ = row_indices()
    for row, index in zip(data.train.take_all(), train_idx, strict=True):
        sample = rendered(index)
        nearest = Image.fromarray(sample["semantic"]).resize((45, 45), Image.Resampling.NEAREST)
        assert row["image"].shape == (45, 45, 3)
        np.testing.assert_array_equal(row["mask"], np.asarray(nearest))


def test_rows_are_deterministic_by_seed(ray_local, segmented):
    _, train, _ = segmented
    again = SOURCES.get("shapes")(cfg_for()).train.take_all()
    other = SOURCES.get("shapes")(cfg_for(seed=1)).train.take_all()
    for key in ("image", "mask"):
        np.testing.assert_array_equal(
            np.stack([r[key] for r in train]), np.stack([r[key] for r in again])
        )
    assert not np.array_equal(np.stack([r["mask"] for r in train]), [r["mask"] for r in other])
    train_idx, _ = row_indices()
    np.testing.assert_array_equal(other[0]["image"], rendered(train_idx[0], seed=1)["image"])


def test_classification_rows_are_unchanged(ray_local):
    data = SOURCES.get("shapes")(cfg_for("classification"))
    assert data.class_names == list(shapes.SHAPE_CLASSES[:5])
    batch = data.train.take_batch(100, batch_format="numpy")
    assert set(batch) == {"image", "label"} and batch["label"].dtype == np.int64
    train_idx, _ = row_indices()
    for row, index in zip(data.train.take_all(), train_idx, strict=True):
        sample = rendered(index)
        assert row["label"] == sample["label"]
        np.testing.assert_array_equal(row["image"], sample["image"])
