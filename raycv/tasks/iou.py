"""IoU arithmetic on confusion matrices (rows: truth), shared by the training evaluator
and ``raycv eval``."""

from __future__ import annotations

import math

import numpy as np
import torch


def segmentation_scores(
    confusion: torch.Tensor, class_names: list[str], prefix: str
) -> dict[str, float]:
    """mIoU, pixel accuracy and each class's IoU from a confusion matrix (rows: truth).
    A class absent from both truth and prediction has no IoU and is left out of the mean,
    as in torchvision's references."""
    confusion = confusion.double()
    hits = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - hits
    iou = hits / union  # NaN where union == 0
    out = {
        f"{prefix}_miou": iou.nanmean().nan_to_num(0.0).item(),
        f"{prefix}_pixel_acc": (hits.sum() / confusion.sum().clamp(min=1)).item(),
    }
    for name, value in zip(class_names, iou.tolist()):
        out[f"{prefix}_iou/{name}"] = value
    return out


def image_confusions(
    truth: np.ndarray, predicted: np.ndarray, num_classes: int, ignore_index: int
) -> np.ndarray:
    """int64 (N, C, C): each image's confusion matrix (rows: truth) of (N, H, W) class ids,
    its ``ignore_index`` pixels left out, as the evaluator leaves them out."""
    n = len(truth)
    labelled = (truth != ignore_index) & (truth < num_classes)
    image = np.broadcast_to(np.arange(n)[:, None, None], truth.shape)
    cells = (image * num_classes + truth.astype(np.int64)) * num_classes + predicted
    counts = np.bincount(cells[labelled], minlength=n * num_classes**2)
    return counts.reshape(n, num_classes, num_classes)


def mean_iou(confusion: np.ndarray) -> float:
    """``segmentation_scores``' mIoU of one confusion matrix (classes absent from truth and
    prediction left out); NaN when no pixel is labelled."""
    hits = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - hits
    present = union > 0
    return float((hits[present] / union[present]).mean()) if present.any() else math.nan
