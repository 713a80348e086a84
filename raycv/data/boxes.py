"""Box geometry for detection: boxes moved by the same affine warp as their image's pixels.

Boxes are float (K, 4) ``x1, y1, x2, y2`` in pixel-edge units of the image they belong to: a
box around pixels 0..9 of a row is ``x1 = 0, x2 = 10``. That is the convention of
``affine_grid(..., align_corners=False)``, whose [-1, 1] spans the pixels' outer edges, so a
box converts to the warp's unit coordinates without half-pixel shifts."""

from __future__ import annotations

import numpy as np

# A warped box that keeps less than this share of its area inside the output is dropped:
# what is left of the object is too little to name it (albumentations' min_visibility idea).
MIN_VISIBLE = 0.25


def warp_boxes(
    boxes: np.ndarray,
    theta: np.ndarray,
    height: float,
    width: float,
    size: int,
    min_visible: float = MIN_VISIBLE,
) -> tuple[np.ndarray, np.ndarray]:
    """Move (K, 4) boxes of an ``height`` x ``width`` image through the ``affine_grid``
    ``theta`` (2, 3) that samples its ``size`` x ``size`` output. Returns the boxes that stay
    (each the axis-aligned box around its four moved corners, clipped to the output) and the
    (K,) bool mask of which stayed.

    ``theta`` maps output unit coordinates to input ones; boxes travel the other way, so
    it is inverted here."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    linear, shift = np.asarray(theta, np.float64)[:, :2], np.asarray(theta, np.float64)[:, 2]
    corners = boxes[:, [0, 1, 2, 1, 0, 3, 2, 3]].reshape(-1, 4, 2)  # (K, 4 corners, xy)
    unit = corners / np.array([width, height]) * 2 - 1
    moved = (unit - shift) @ np.linalg.inv(linear).T
    pixels = (moved + 1) * size / 2
    warped = np.concatenate([pixels.min(axis=1), pixels.max(axis=1)], axis=1)
    clipped = np.clip(warped, 0, size)
    keep = _area(clipped) >= min_visible * _area(warped)
    keep &= (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped[keep].astype(np.float32), keep


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """The pixel-edge box (x1, y1, x2, y2) around a bool mask's True pixels; None if none."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two single boxes."""
    inter = np.concatenate([np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])])
    area = _area(inter[None])[0]
    return float(area / (_area(a[None])[0] + _area(b[None])[0] - area))
