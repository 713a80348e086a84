"""Detection boxes through the fused warp: each box moves with its shape's pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycv.config import AugmentConfig
from raycv.data import shapes
from raycv.data.augment import build_preset
from raycv.data.boxes import box_iou, mask_box, warp_boxes

PLAIN = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "mean": (0, 0, 0), "std": (1, 1, 1)}
SIZE = 128


def instance_samples(n: int) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """Rendered shapes: uint8 (n, 3, S, S) images, (n, S, S) masks holding instance i + 1 on
    its visible pixels (shapes' visible masks never overlap), and each image's boxes."""
    samples = [
        shapes.render(i, image_size=SIZE, num_classes=6, difficulty="medium", seed=3)
        for i in range(n)
    ]
    images = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2)
    ids = np.stack(
        [(s["masks"] * np.arange(1, len(s["masks"]) + 1)[:, None, None]).sum(0) for s in samples]
    )
    return images, torch.from_numpy(ids.astype(np.uint8)), [s["boxes"] for s in samples]


def warped(rotation: float, n: int = 48) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image: the moved boxes, which stayed, and the instance mask moved by the same draw."""
    cfg = AugmentConfig(**PLAIN, rotation=rotation, scale=(0.3, 1.0), vflip=0.5)
    preset = build_preset("classic", cfg, SIZE, ignore_index=0)
    images, ids, boxes = instance_samples(n)
    _, masks = preset.transform_pair(images, ids, np.random.default_rng(7))
    _, moved = preset.transform_boxes(images, boxes, np.random.default_rng(7))
    return [(b, keep, m.numpy()) for (b, keep), m in zip(moved, masks)]


def kept_with_masks(rotation: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """(moved box, tight box of its moved mask) for every kept box; fails on a kept box
    whose shape left the output (the box would then label nothing)."""
    pairs = []
    for boxes, keep, mask in warped(rotation):
        for box, instance in zip(boxes, np.flatnonzero(keep) + 1):
            tight = mask_box(mask == instance)
            assert tight is not None, f"a kept box {box} whose shape left the image"
            pairs.append((box, tight))
    assert len(pairs) > 60
    return pairs


def encloses(box: np.ndarray, tight: np.ndarray) -> bool:
    # Nearest-neighbour mask pixels may reach half a pixel past the exact edge.
    return bool(np.all(box[:2] <= tight[:2] + 1) and np.all(box[2:] >= tight[2:] - 1))


def test_each_box_still_frames_its_shape_after_flips_and_crops():
    pairs = kept_with_masks(rotation=0.0)
    assert all(encloses(box, tight) for box, tight in pairs)
    # A box the crop cut keeps its full extent along the cut, where its shape may narrow
    # (a diamond cut near its tip): IoU is checked on the boxes left whole.
    whole = [box_iou(b, t) for b, t in pairs if b.min() > 0 and b.max() < SIZE]
    assert len(whole) > 30
    assert min(whole) >= 0.9, sorted(whole)[:5]


def test_a_rotated_box_encloses_its_rotated_shape():
    pairs = kept_with_masks(rotation=30.0)
    assert all(encloses(box, tight) for box, tight in pairs)
    # The box around a rotated box is loose for round shapes, never for square ones.
    assert np.median([box_iou(b, t) for b, t in pairs]) >= 0.6


def test_boxes_cut_by_the_crop_are_clipped_or_dropped():
    # Identity warp of a 10 x 10 image into a 10 x 10 output: x in [-1, 1] both ways.
    theta = np.array([[0.5, 0, 0.5], [0, 0.5, 0.5]])  # the bottom-right quarter, zoomed 2x
    boxes = np.array([[6, 6, 10, 10], [0, 0, 4, 4], [4, 4, 8, 8], [0, 4, 6, 10]], np.float32)
    moved, keep = warp_boxes(boxes, theta, 10, 10, 10)
    assert keep.tolist() == [True, False, True, False]  # the last keeps 1/6 of its area
    np.testing.assert_allclose(moved, [[2, 2, 10, 10], [0, 0, 6, 6]], atol=1e-5)


@pytest.mark.parametrize("hflip, vflip", [(1.0, 0.0), (0.0, 1.0)])
def test_a_flip_mirrors_the_box(hflip, vflip):
    cfg = AugmentConfig(
        **PLAIN, rotation=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=hflip, vflip=vflip
    )
    preset = build_preset("classic", cfg, SIZE)
    images = torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8)
    box = np.array([[4, 8, 20, 40]], np.float32)
    _, [(moved, keep)] = preset.transform_boxes(images, [box], np.random.default_rng(0))
    expected = [SIZE - 20, 8, SIZE - 4, 40] if hflip else [4, SIZE - 40, 20, SIZE - 8]
    assert keep.tolist() == [True]
    np.testing.assert_allclose(moved[0], expected, atol=1e-4)
